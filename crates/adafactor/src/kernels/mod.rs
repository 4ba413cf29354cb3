//! Fused slice kernels (see the module docs of each pass).
