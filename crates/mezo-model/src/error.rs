use std::path::PathBuf;

/// Everything that can go wrong between a checkpoint directory on disk and a runnable model.
/// Each variant names the file, and the field or tensor, a user has to look at.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: not valid JSON for this file: {source}")]
    Json { path: PathBuf, source: serde_json::Error },

    #[error("{path}: field `{field}`: {message}")]
    Config { path: PathBuf, field: String, message: String },

    #[error("{path}: model_type `{model_type}` is not supported (supported: opt, llama, qwen2, mistral)")]
    UnsupportedModelType { path: PathBuf, model_type: String },

    #[error("LoRA target `{target}` is not a module of {model_type} models (they have {expected})")]
    UnsupportedTarget { target: String, model_type: String, expected: String },

    #[error("{dir}: no weights found (looked for model.safetensors, model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json)")]
    NoWeights { dir: PathBuf },

    #[error("{path}: corrupt or unreadable weights file: {message}")]
    CorruptWeights { path: PathBuf, message: String },

    #[error("{path}: missing tensor `{tensor}` (required by config.json)")]
    MissingTensor { path: PathBuf, tensor: String },

    #[error("{path}: tensor `{tensor}` has shape {actual:?} but config.json implies {expected:?}")]
    ShapeMismatch { path: PathBuf, tensor: String, expected: Vec<i64>, actual: Vec<i64> },

    #[error("{path}: tensor `{tensor}` has unsupported dtype {dtype}")]
    UnsupportedDType { path: PathBuf, tensor: String, dtype: String },

    #[error("{dir}: no tokenizer found (looked for tokenizer.json, or vocab.json + merges.txt)")]
    NoTokenizer { dir: PathBuf },

    #[error("{path}: tokenizer error: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("invalid {what} `{value}`: expected {expected}")]
    InvalidArgument { what: &'static str, value: String, expected: &'static str },

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ModelError {
    let path = path.into();
    move |source| ModelError::Io { path, source }
}
