//! Candle's side of the fused data path (`jit_compile = true`): slices of candle's CPU storage
//! for the core's fused backend ([`adafactor::engine::fused`]), read under the storage's read
//! lock and written in place through `InplaceOp1`, with no `Var::set` copy and no allocation
//! proportional to the parameter count. Which stages run, and in which order, is the core's.

use crate::optimizer::{err, Adafactor};
use crate::slot::Slot;
use adafactor::engine::fused::{Buffer, ElementType, Slice, SliceMut, SliceStore};
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Storage, StorageRef, Tensor};
use rayon::prelude::*;
use std::cell::Cell;

/// Whether a tensor can take the fused path: contiguous, on the CPU, f32/bf16/f16.
pub(crate) fn supports(t: &Tensor) -> bool {
    t.device().is_cpu()
        && t.is_contiguous()
        && matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// The identity of a tensor's storage allocation.
fn storage_addr(t: &Tensor) -> usize {
    let (s, _) = t.storage_and_layout();
    &*s as *const Storage as usize
}

/// The fused path applies when every slot and gradient is supported and no gradient shares
/// storage with a weight or optimizer tensor (it would be read while written). The tensors are
/// looked at in parallel: with thousands of them, each look waits on memory for the tensor's
/// metadata, one after another on a single thread.
pub(crate) fn eligible(opt: &Adafactor, items: &[(usize, Tensor)]) -> bool {
    // Empty variables have nothing to fuse (and candle refuses in-place writes to them).
    if !opt
        .slots
        .par_iter()
        .all(|s| supports(&s.var) && s.var.elem_count() > 0)
        || !items.par_iter().all(|(_, g)| supports(g))
    {
        return false;
    }
    // A sorted list, not a hash set: one allocation for thousands of tensors.
    let mut owned: Vec<usize> = opt
        .slots
        .par_iter()
        .flat_map_iter(|s| {
            std::iter::once(storage_addr(&s.var)).chain(s.kept_tensors().map(storage_addr))
        })
        .collect();
    owned.par_sort_unstable();
    items
        .par_iter()
        .all(|(_, g)| owned.binary_search(&storage_addr(g)).is_err())
}

/// A read lock on a contiguous CPU tensor, with its element range.
struct Read<'a> {
    guard: StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> Read<'a> {
    fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| err("fused path: tensor is not contiguous"))?;
        Ok(Read {
            guard,
            start,
            len: end - start,
        })
    }

    fn cpu(&self) -> Result<&CpuStorage> {
        match &*self.guard {
            Storage::Cpu(c) => Ok(c),
            _ => Err(err("fused path: tensor is not on the CPU")),
        }
    }

    /// The tensor's elements, in their float type.
    fn slice(&self) -> Result<Slice<'_>> {
        let r = self.start..self.start + self.len;
        Ok(match self.cpu()? {
            CpuStorage::F32(v) => Slice::F32(&v[r]),
            CpuStorage::BF16(v) => Slice::Bf16(&v[r]),
            CpuStorage::F16(v) => Slice::F16(&v[r]),
            other => {
                return Err(err(format!(
                    "fused path: a tensor holds {:?}, not a float type",
                    candle_core::backend::BackendStorage::dtype(other)
                )))
            }
        })
    }
}

/// An in-place op on one tensor, defined by a closure over its (typed) slice.
struct InPlace<F> {
    name: &'static str,
    f: F,
}

impl<F: Fn(&mut CpuStorage, &Layout) -> Result<()>> InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        (self.f)(s, l)
    }
}

fn in_place(
    t: &Tensor,
    name: &'static str,
    f: impl Fn(&mut CpuStorage, &Layout) -> Result<()>,
) -> Result<()> {
    t.inplace_op1(&InPlace { name, f })
}

/// The buffers of one step: the slots' weights, averages and accumulators and this step's
/// gradients (indexed by slot), as the core's fused backend reads and writes them.
pub(crate) struct Buffers<'a> {
    slots: &'a [Slot],
    grads: Vec<Option<&'a Tensor>>,
}

impl<'a> Buffers<'a> {
    /// The buffers of `slots` with the gradients of `items` (`(slot index, gradient)`).
    pub(crate) fn new(slots: &'a [Slot], items: &'a [(usize, Tensor)]) -> Self {
        let mut grads = vec![None; slots.len()];
        for (i, g) in items {
            grads[*i] = Some(g);
        }
        Buffers { slots, grads }
    }

    fn tensor(&self, var: usize, buffer: Buffer) -> Result<&'a Tensor> {
        let slot = &self.slots[var];
        let t = match buffer {
            Buffer::Weight => Some(slot.var.as_tensor()),
            Buffer::Gradient => self.grads[var],
            Buffer::Average => slot.ema(),
            Buffer::Accumulator => slot.accumulator(),
        };
        t.ok_or_else(|| err(format!("internal: `{}` has no {buffer:?}", slot.name)))
    }
}

impl SliceStore for Buffers<'_> {
    type Error = candle_core::Error;

    fn core_error(e: adafactor::Error) -> candle_core::Error {
        crate::optimizer::core_err(e)
    }

    fn element_type(&self, var: usize) -> ElementType {
        match self.slots[var].var.dtype() {
            DType::BF16 => ElementType::Bf16,
            DType::F16 => ElementType::F16,
            // `supports` admits only the three float types.
            _ => ElementType::F32,
        }
    }

    fn read<R>(&self, var: usize, buffer: Buffer, f: impl FnOnce(Slice<'_>) -> R) -> Result<R> {
        let r = Read::new(self.tensor(var, buffer)?)?;
        Ok(f(r.slice()?))
    }

    fn write<R>(&self, var: usize, buffer: Buffer, f: impl FnOnce(SliceMut<'_>) -> R) -> Result<R> {
        let f = Cell::new(Some(f));
        let out = Cell::new(None);
        in_place(self.tensor(var, buffer)?, "adafactor-write", |s, l| {
            let (start, end) = l
                .contiguous_offsets()
                .ok_or_else(|| err("fused path: destination is not contiguous"))?;
            let view = match s {
                CpuStorage::F32(v) => SliceMut::F32(&mut v[start..end]),
                CpuStorage::BF16(v) => SliceMut::Bf16(&mut v[start..end]),
                CpuStorage::F16(v) => SliceMut::F16(&mut v[start..end]),
                other => {
                    return Err(err(format!(
                        "fused path: destination holds {:?}, not a float type",
                        candle_core::backend::BackendStorage::dtype(other)
                    )))
                }
            };
            let f = f
                .take()
                .ok_or_else(|| err("internal: an in-place op ran twice"))?;
            out.set(Some(f(view)));
            Ok(())
        })?;
        out.into_inner()
            .ok_or_else(|| err("internal: an in-place op did not run"))
    }
}
