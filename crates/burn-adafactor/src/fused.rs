//! burn's side of the fused data path: slices of the Flex backend's CPU storage for the core's
//! fused backend ([`adafactor::engine::fused`]). Weights are written in place: a parameter
//! taken out of its module is uniquely owned after backward, so its buffer is written with no
//! copy; a buffer something else still holds (a clone of the model, a value the caller kept)
//! is copied once on write, and the other holder keeps the old values. Which stages run, and
//! in which order, is the core's.

use crate::error::{Error, invalid};
use adafactor::engine::fused::{Buffer, ElementType, Slice, SliceMut, SliceStore};
use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Device, Element, Tensor, bf16, f16};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Whether a parameter can take the fused path: on the Flex CPU device, f32/bf16/f16, not empty.
pub(crate) fn supports(device: &Device, dtype: DType, len: usize) -> bool {
    *device == Device::flex() && matches!(dtype, DType::F32 | DType::BF16 | DType::F16) && len > 0
}

/// A flat tensor's Flex primitive (moved, no copy).
fn primitive(t: Tensor<1>) -> Result<FlexTensor, Error> {
    t.try_into_primitive::<Flex>().map_err(|e| {
        invalid(format!(
            "fused path: a tensor is not on the Flex backend: {e:?}"
        ))
    })
}

/// The buffers of one step, as the core's fused backend reads and writes them (indexed by slot).
pub(crate) struct Buffers {
    weights: Vec<Mutex<FlexTensor>>,
    grads: Vec<Option<FlexTensor>>,
    averages: Vec<Option<Mutex<FlexTensor>>>,
    accumulators: Vec<Option<Mutex<FlexTensor>>>,
    types: Vec<ElementType>,
    copies: AtomicUsize,
}

fn element_type(d: DType) -> ElementType {
    match d {
        DType::BF16 => ElementType::Bf16,
        DType::F16 => ElementType::F16,
        _ => ElementType::F32,
    }
}

type Flat = Vec<Tensor<1>>;
type OptFlat = Vec<Option<Tensor<1>>>;

impl Buffers {
    /// The buffers of one step: every slot's weight, average and accumulator, and the gradients
    /// present (all flat, on Flex; checked by the caller).
    pub fn new(
        weights: Flat,
        grads: OptFlat,
        averages: OptFlat,
        accumulators: OptFlat,
    ) -> Result<Self, Error> {
        let types = weights.iter().map(|w| element_type(w.dtype())).collect();
        let lock = |v: OptFlat| -> Result<Vec<Option<Mutex<FlexTensor>>>, Error> {
            v.into_iter()
                .map(|t| t.map(|t| primitive(t).map(Mutex::new)).transpose())
                .collect()
        };
        Ok(Buffers {
            weights: weights
                .into_iter()
                .map(|w| primitive(w).map(Mutex::new))
                .collect::<Result<_, _>>()?,
            grads: grads
                .into_iter()
                .map(|g| g.map(primitive).transpose())
                .collect::<Result<_, _>>()?,
            averages: lock(averages)?,
            accumulators: lock(accumulators)?,
            types,
            copies: AtomicUsize::new(0),
        })
    }

    /// The weights, averages and accumulators as flat tensors again, and how many buffers
    /// were shared and had to be copied on write.
    pub fn finish(self) -> (Flat, OptFlat, OptFlat, usize) {
        let back = |m: Mutex<FlexTensor>| {
            let t = m.into_inner().unwrap_or_else(|p| p.into_inner());
            Tensor::<1>::from_primitive::<Flex>(t)
        };
        let opt = |v: Vec<Option<Mutex<FlexTensor>>>| v.into_iter().map(|m| m.map(back)).collect();
        (
            self.weights.into_iter().map(back).collect(),
            opt(self.averages),
            opt(self.accumulators),
            self.copies.into_inner(),
        )
    }

    fn cell(&self, var: usize, buffer: Buffer) -> Result<&Mutex<FlexTensor>, Error> {
        let c = match buffer {
            Buffer::Weight => self.weights.get(var),
            Buffer::Average => self.averages.get(var).and_then(Option::as_ref),
            Buffer::Accumulator => self.accumulators.get(var).and_then(Option::as_ref),
            Buffer::Gradient => None,
        };
        c.ok_or_else(|| {
            invalid(format!(
                "internal: parameter {var} has no {buffer:?} buffer"
            ))
        })
    }
}

fn view(t: &FlexTensor) -> Option<Slice<'_>> {
    Some(match t.dtype() {
        DType::F32 => Slice::F32(t.as_slice::<f32>()?),
        DType::BF16 => Slice::Bf16(t.as_slice::<bf16>()?),
        DType::F16 => Slice::F16(t.as_slice::<f16>()?),
        _ => return None,
    })
}

/// The tensor's own elements, writable: a shared buffer is copied first (`copied` counts it).
/// The range comes from the layout: a buffer can be larger than the tensor.
fn view_mut<'a, E: Element + bytemuck::Pod>(
    t: &'a mut FlexTensor,
    copied: &AtomicUsize,
) -> Option<&'a mut [E]> {
    if !t.is_unique() {
        copied.fetch_add(1, Ordering::Relaxed);
        let _ = t.storage_mut::<E>();
    }
    let (start, end) = t.layout().contiguous_offsets()?;
    t.try_storage_mut::<E>()?.get_mut(start..end)
}

impl SliceStore for Buffers {
    type Error = Error;

    fn core_error(e: adafactor::Error) -> Error {
        Error::Core(e)
    }

    fn element_type(&self, var: usize) -> ElementType {
        self.types.get(var).copied().unwrap_or(ElementType::F32)
    }

    fn read<R>(
        &self,
        var: usize,
        buffer: Buffer,
        f: impl FnOnce(Slice<'_>) -> R,
    ) -> Result<R, Error> {
        let unreadable = || {
            invalid(format!(
                "fused path: {buffer:?} of parameter {var} is not a contiguous float buffer"
            ))
        };
        if buffer == Buffer::Gradient {
            let g = self
                .grads
                .get(var)
                .and_then(Option::as_ref)
                .ok_or_else(unreadable)?;
            return Ok(f(view(g).ok_or_else(unreadable)?));
        }
        let guard = self
            .cell(var, buffer)?
            .lock()
            .map_err(|_| invalid("internal: a poisoned lock"))?;
        Ok(f(view(&guard).ok_or_else(unreadable)?))
    }

    fn write<R>(
        &self,
        var: usize,
        buffer: Buffer,
        f: impl FnOnce(SliceMut<'_>) -> R,
    ) -> Result<R, Error> {
        let unwritable = || {
            invalid(format!(
                "fused path: {buffer:?} of parameter {var} is not a contiguous float buffer"
            ))
        };
        let mut guard = self
            .cell(var, buffer)?
            .lock()
            .map_err(|_| invalid("internal: a poisoned lock"))?;
        let t: &mut FlexTensor = &mut guard;
        let c = &self.copies;
        let v = match t.dtype() {
            DType::F32 => SliceMut::F32(view_mut::<f32>(t, c).ok_or_else(unwritable)?),
            DType::BF16 => SliceMut::Bf16(view_mut::<bf16>(t, c).ok_or_else(unwritable)?),
            DType::F16 => SliceMut::F16(view_mut::<f16>(t, c).ok_or_else(unwritable)?),
            _ => return Err(unwritable()),
        };
        Ok(f(v))
    }
}
