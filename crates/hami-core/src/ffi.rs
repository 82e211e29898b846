//! CUDA driver and NVML types and codes used by the hooks (from `cuda.h` and
//! `nvml.h`; only what we touch).

use std::ffi::c_int;

pub type CUresult = c_int;
pub const CUDA_SUCCESS: CUresult = 0;
pub const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
pub const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
pub const CUDA_ERROR_UNKNOWN: CUresult = 999;

pub type NvmlReturn = c_int;
pub const NVML_SUCCESS: NvmlReturn = 0;
pub const NVML_ERROR_UNINITIALIZED: NvmlReturn = 1;
pub const NVML_ERROR_UNKNOWN: NvmlReturn = 999;

/// `CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM`.
pub const CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM: u64 = 2;
/// `CU_MEM_ATTACH_GLOBAL`.
pub const CU_MEM_ATTACH_GLOBAL: u32 = 1;
/// `CU_MEM_LOCATION_TYPE_DEVICE`.
pub const CU_MEM_LOCATION_TYPE_DEVICE: c_int = 1;

/// `CUmemAllocationProp` up to the location (the rest is not read).
#[repr(C)]
pub struct MemAllocationProp {
    pub kind: c_int,
    pub requested_handle_types: c_int,
    pub location_type: c_int,
    pub location_id: c_int,
}

/// `CUDA_ARRAY_DESCRIPTOR`.
#[repr(C)]
pub struct ArrayDescriptor {
    pub width: usize,
    pub height: usize,
    pub format: u32,
    pub num_channels: u32,
}

/// `CUDA_ARRAY3D_DESCRIPTOR`.
#[repr(C)]
pub struct Array3dDescriptor {
    pub width: usize,
    pub height: usize,
    pub depth: usize,
    pub format: u32,
    pub num_channels: u32,
    pub flags: u32,
}

/// `CUipcMemHandle`, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct IpcMemHandle(pub [u8; 64]);

/// `CUDA_EXTERNAL_MEMORY_HANDLE_DESC` up to `size`.
#[repr(C)]
pub struct ExternalMemoryHandleDesc {
    pub kind: c_int,
    pub handle: [u64; 2],
    pub size: u64,
    pub flags: u32,
}

/// `CUDA_MEM_ALLOC_NODE_PARAMS`: `CUmemPoolProps` (88 bytes; its location
/// at offset 8), `accessDescs`, `accessDescCount`, `bytesize`, `dptr`.
#[repr(C)]
pub struct MemAllocNodeParams {
    pub pool_alloc_type: c_int,
    pub pool_handle_types: c_int,
    pub location_type: c_int,
    pub location_id: c_int,
    pub pool_rest: [u8; 72],
    pub access_descs: *const std::ffi::c_void,
    pub access_desc_count: usize,
    pub bytesize: usize,
    pub dptr: u64,
}

/// `CUlaunchConfig` up to the stream.
#[repr(C)]
pub struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_mem_bytes: u32,
    pub stream: usize,
}

/// `nvmlMemory_t`.
#[repr(C)]
pub struct NvmlMemory {
    pub total: u64,
    pub free: u64,
    pub used: u64,
}

/// `nvmlMemory_v2_t`.
#[repr(C)]
pub struct NvmlMemoryV2 {
    pub version: u32,
    pub total: u64,
    pub reserved: u64,
    pub free: u64,
    pub used: u64,
}

/// `nvmlProcessInfo_t` (listings `_v2`, `_v3`).
#[repr(C)]
pub struct NvmlProcessInfo {
    pub pid: u32,
    pub used_gpu_memory: u64,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
}

/// `nvmlProcessInfo_v1_t`.
#[repr(C)]
pub struct NvmlProcessInfoV1 {
    pub pid: u32,
    pub used_gpu_memory: u64,
}

const _: () = {
    assert!(std::mem::size_of::<MemAllocNodeParams>() == 120);
    assert!(std::mem::offset_of!(MemAllocNodeParams, bytesize) == 104);
    assert!(std::mem::offset_of!(LaunchConfig, stream) == 32);
    assert!(std::mem::offset_of!(ExternalMemoryHandleDesc, size) == 24);
    assert!(std::mem::size_of::<NvmlProcessInfo>() == 24);
};

/// Bytes per element of a `CUarray_format`.
pub fn array_format_bytes(format: u32) -> u64 {
    match format {
        0x01 | 0x08 => 1,
        0x02 | 0x09 | 0x10 => 2,
        _ => 4,
    }
}
