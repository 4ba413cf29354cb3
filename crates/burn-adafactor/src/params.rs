//! A burn module's float parameters as the optimizer sees them: their paths (burn's own, as in
//! module records), ids, shapes and dtypes; taking their values out of the module for one step
//! (moved, not cloned, so that the fused path finds each buffer uniquely owned) and putting
//! them back with their autodiff flags.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
#[cfg(feature = "autodiff")]
use burn::tensor::GradientCheckpointingStrategy;
use burn::tensor::{DType, Device, Tensor};
use std::collections::HashMap;

/// One float parameter of a module.
#[derive(Debug, Clone)]
pub(crate) struct ParamInfo {
    /// Burn's module path (`layer1.weight`, `blocks.0.bias`).
    pub path: String,
    pub id: ParamId,
    pub shape: Vec<usize>,
    pub dtype: DType,
    /// The device without autodiff (where gradients and optimizer state live).
    pub device: Device,
}

/// Lists every float parameter of `module`, in visit order.
pub(crate) fn list<M: Module>(module: &M) -> Vec<ParamInfo> {
    let mut v = Lister {
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

struct Lister {
    path: Vec<String>,
    out: Vec<ParamInfo>,
}

impl ModuleVisitor for Lister {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = param.val();
        self.out.push(ParamInfo {
            path: self.path.join("."),
            id: param.id,
            shape: t.dims().to_vec(),
            dtype: t.dtype(),
            device: t.device().without_autodiff(),
        });
    }
}

/// Runs `$body` with the const `$D` bound to a rank between 1 and 8.
macro_rules! with_rank {
    ($rank:expr, $D:ident => $body:expr, $else:expr) => {
        match $rank {
            1 => {
                const $D: usize = 1;
                $body
            }
            2 => {
                const $D: usize = 2;
                $body
            }
            3 => {
                const $D: usize = 3;
                $body
            }
            4 => {
                const $D: usize = 4;
                $body
            }
            5 => {
                const $D: usize = 5;
                $body
            }
            6 => {
                const $D: usize = 6;
                $body
            }
            7 => {
                const $D: usize = 7;
                $body
            }
            8 => {
                const $D: usize = 8;
                $body
            }
            _ => $else,
        }
    };
}
pub(crate) use with_rank;

/// The autodiff flags of a parameter, put back after its value was replaced (what burn's own
/// `ModuleOptimizer` restores).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Flags {
    autodiff: bool,
    require_grad: bool,
    #[cfg(feature = "autodiff")]
    checkpointing: Option<GradientCheckpointingStrategy>,
    distributed: bool,
}

impl Flags {
    fn capture<const D: usize>(t: &Tensor<D>) -> Self {
        Flags {
            autodiff: t.is_autodiff(),
            require_grad: t.is_require_grad(),
            #[cfg(feature = "autodiff")]
            checkpointing: t.gradient_checkpointing_strategy(),
            distributed: t.is_distributed(),
        }
    }

    fn restore<const D: usize>(self, t: Tensor<D>, id: ParamId) -> Tensor<D> {
        if !self.autodiff {
            return t;
        }
        let mut t = t.autodiff();
        #[cfg(feature = "autodiff")]
        if let Some(s) = self.checkpointing {
            t = t.with_gradient_checkpointing_strategy(s);
        }
        if self.require_grad {
            t = t.require_grad();
        }
        if self.distributed {
            t = t.set_distributed(id);
        }
        t
    }
}

/// Parameter values taken out of a module: flat (rank 1), without autodiff, by id.
#[derive(Default)]
pub(crate) struct Taken {
    values: HashMap<ParamId, (Tensor<1>, Vec<usize>, Flags)>,
}

impl Taken {
    /// Takes the values of the parameters in `ids` out of `module` (each replaced by an empty
    /// placeholder until [`Taken::put_back`]).
    pub fn take<M: Module>(module: M, ids: &[ParamId]) -> (M, Self) {
        let mut m = Taker {
            want: ids.iter().copied().collect(),
            taken: Taken::default(),
        };
        let module = module.map(&mut m);
        (module, m.taken)
    }

    /// The flat value of a parameter, removed from the set.
    pub fn remove(&mut self, id: ParamId) -> Option<Tensor<1>> {
        self.values.get_mut(&id).map(|(t, _, _)| {
            let placeholder = Tensor::<1>::empty([0], (&t.device(), t.dtype()));
            std::mem::replace(t, placeholder)
        })
    }

    /// Sets the flat value of a parameter (after [`Taken::remove`]).
    pub fn set(&mut self, id: ParamId, value: Tensor<1>) {
        if let Some((t, _, _)) = self.values.get_mut(&id) {
            *t = value;
        }
    }

    /// Puts every value back into `module`, in its shape, with its flags.
    pub fn put_back<M: Module>(self, module: M) -> M {
        module.map(&mut Putter { taken: self })
    }
}

struct Taker {
    want: std::collections::HashSet<ParamId>,
    taken: Taken,
}

impl ModuleMapper for Taker {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !self.want.contains(&param.id) {
            return param;
        }
        let (id, tensor, mapper) = param.consume();
        let flags = Flags::capture(&tensor);
        let shape = tensor.dims().to_vec();
        let device = tensor.device();
        let dtype = tensor.dtype();
        let n = shape.iter().product::<usize>();
        let flat = tensor.inner().reshape([n]);
        self.taken.values.insert(id, (flat, shape, flags));
        let placeholder = Tensor::<D>::empty([0; D], (&device, dtype));
        Param::from_mapped_value(id, placeholder, mapper)
    }
}

struct Putter {
    taken: Taken,
}

impl ModuleMapper for Putter {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some((flat, shape, flags)) = self.taken.values.remove(&param.id) else {
            return param;
        };
        let (id, _placeholder, mapper) = param.consume();
        let mut dims = [0usize; D];
        dims.copy_from_slice(&shape);
        let value = flags.restore(flat.reshape(dims), id);
        Param::from_mapped_value(id, value, mapper)
    }
}
