/// What can go wrong in the core math: only bad arguments, since nothing here does IO.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("invalid {what} `{value}`: expected {expected}")]
    InvalidArgument { what: &'static str, value: String, expected: &'static str },

    /// Z is indexed by a u32 element index, so a tensor can have at most 2^32 elements.
    #[error(
        "parameter `{name}` has {numel} elements; Z is defined for 0..=2^32 elements (u32 element index)"
    )]
    TooManyElements { name: String, numel: i64 },

    /// The fused CUDA kernels could not be built or launched (NVRTC or the driver said why).
    #[error("CUDA kernels: {0}")]
    Cuda(String),
}

pub type Result<T> = std::result::Result<T, CoreError>;
