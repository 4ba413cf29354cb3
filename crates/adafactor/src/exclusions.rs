//! `exclude_from_weight_decay`: which variables skip decoupled weight decay.

use crate::error::{Error, Result};
use regex::Regex;

/// Name patterns excluded from weight decay (variable identities are kept by the framework
/// adapter, which owns the variables).
///
/// As in Keras, the fragments are joined into **one regex** `a|b|c` and searched (not matched)
/// in each variable name, so `"bias"` excludes `"dense/bias"` and `"bias_2"`.
#[derive(Debug, Clone, Default)]
pub struct NameExclusions {
    pattern: Option<Regex>,
    fragments: Vec<String>,
}

impl NameExclusions {
    /// Compiles the fragments. An empty list excludes nothing.
    ///
    /// # Errors
    /// A fragment that makes the joined pattern an invalid regex.
    pub fn new<S: AsRef<str>>(fragments: &[S]) -> Result<Self> {
        let mut fragments: Vec<String> = fragments.iter().map(|s| s.as_ref().to_string()).collect();
        fragments.sort();
        fragments.dedup();
        if fragments.is_empty() {
            return Ok(Self::default());
        }
        let joined = fragments.join("|");
        let pattern = Regex::new(&joined).map_err(|e| {
            Error::invalid(
                "var_names",
                format!(
                    "`exclude_from_weight_decay(var_names={fragments:?})`: invalid pattern: {e}"
                ),
            )
        })?;
        Ok(Self {
            pattern: Some(pattern),
            fragments,
        })
    }

    /// Whether a variable of this name is excluded.
    pub fn excludes(&self, name: &str) -> bool {
        self.pattern.as_ref().is_some_and(|p| p.is_match(name))
    }

    /// The fragments, sorted and deduplicated.
    pub fn fragments(&self) -> &[String] {
        &self.fragments
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn searches_joined_regex() {
        let ex = NameExclusions::new(&["bias", "gamma"]).unwrap();
        assert!(ex.excludes("dense_bias"));
        assert!(ex.excludes("layer_norm_gamma"));
        assert!(!ex.excludes("dense_kernel"));
        assert!(!NameExclusions::new::<&str>(&[]).unwrap().excludes("bias"));
        let re = NameExclusions::new(&["^out_"]).unwrap();
        assert!(re.excludes("out_kernel") && !re.excludes("x_out_kernel"));
        assert!(NameExclusions::new(&["("]).is_err());
    }
}
