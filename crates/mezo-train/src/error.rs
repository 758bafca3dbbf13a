#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] mezo_model::ModelError),
    #[error(transparent)]
    Data(#[from] mezo_data::DataError),
    #[error(transparent)]
    Core(#[from] mezo_core::CoreError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
