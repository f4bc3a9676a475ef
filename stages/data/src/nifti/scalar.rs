//! Voxel scalar types: NIfTI datatype codes and byte decoding/encoding.

use super::header::DataType;

/// A Rust type that NIfTI stores natively (one datatype code per type).
pub trait NiftiScalar: Copy + Send + Sync + 'static {
    const DATATYPE: DataType;
    /// Bytes per voxel.
    const SIZE: usize;
    fn read_le(bytes: &[u8]) -> Self;
    fn read_be(bytes: &[u8]) -> Self;
    fn write_le(self, out: &mut Vec<u8>);
    fn to_f64(self) -> f64;
    fn to_f32(self) -> f32;
}

macro_rules! scalar {
    ($t:ty, $dt:expr) => {
        impl NiftiScalar for $t {
            const DATATYPE: DataType = $dt;
            const SIZE: usize = std::mem::size_of::<$t>();
            #[inline(always)]
            fn read_le(bytes: &[u8]) -> Self {
                let mut b = [0u8; std::mem::size_of::<$t>()];
                b.copy_from_slice(&bytes[..std::mem::size_of::<$t>()]);
                <$t>::from_le_bytes(b)
            }
            #[inline(always)]
            fn read_be(bytes: &[u8]) -> Self {
                let mut b = [0u8; std::mem::size_of::<$t>()];
                b.copy_from_slice(&bytes[..std::mem::size_of::<$t>()]);
                <$t>::from_be_bytes(b)
            }
            #[inline(always)]
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn to_f32(self) -> f32 {
                self as f32
            }
        }
    };
}

scalar!(u8, DataType::U8);
scalar!(i8, DataType::I8);
scalar!(i16, DataType::I16);
scalar!(u16, DataType::U16);
scalar!(i32, DataType::I32);
scalar!(u32, DataType::U32);
scalar!(i64, DataType::I64);
scalar!(u64, DataType::U64);
scalar!(f32, DataType::F32);
scalar!(f64, DataType::F64);

/// Decode a byte chunk (a whole number of voxels) of scalar type `S`,
/// calling `f` per voxel. Monomorphised per (type, closure) so the inner
/// loop is tight; the datatype dispatch happens once per chunk.
#[inline]
pub(crate) fn decode_chunk<S: NiftiScalar>(bytes: &[u8], big_endian: bool, mut f: impl FnMut(S)) {
    if big_endian {
        for c in bytes.chunks_exact(S::SIZE) {
            f(S::read_be(c));
        }
    } else {
        for c in bytes.chunks_exact(S::SIZE) {
            f(S::read_le(c));
        }
    }
}

/// Dispatch on a runtime datatype to a generic body over its scalar type.
/// `$body` is a generic function item `fn<S: NiftiScalar>(..)` call written as
/// a macro so callers keep their closures monomorphic.
macro_rules! dispatch_datatype {
    ($dt:expr, $S:ident => $body:expr) => {
        match $dt {
            $crate::nifti::DataType::U8 => {
                type $S = u8;
                $body
            }
            $crate::nifti::DataType::I8 => {
                type $S = i8;
                $body
            }
            $crate::nifti::DataType::I16 => {
                type $S = i16;
                $body
            }
            $crate::nifti::DataType::U16 => {
                type $S = u16;
                $body
            }
            $crate::nifti::DataType::I32 => {
                type $S = i32;
                $body
            }
            $crate::nifti::DataType::U32 => {
                type $S = u32;
                $body
            }
            $crate::nifti::DataType::I64 => {
                type $S = i64;
                $body
            }
            $crate::nifti::DataType::U64 => {
                type $S = u64;
                $body
            }
            $crate::nifti::DataType::F32 => {
                type $S = f32;
                $body
            }
            $crate::nifti::DataType::F64 => {
                type $S = f64;
                $body
            }
        }
    };
}
pub(crate) use dispatch_datatype;
