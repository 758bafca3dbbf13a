//! The MeZO training engine (Malladi et al., 2023): trainable state (LoRA or full-parameter),
//! the two-sided SPSA step with seeded perturbations, optimizers and schedules, the MeZO data
//! protocol and the single-process training loop that the distributed service reuses.

pub mod data;
pub mod engine;
pub mod error;
pub mod graphs;
pub mod optim;
pub mod spec;
pub mod trainer;

pub use engine::{Engine, LossKind, Prepared, StepSettings, Trainable};
pub use error::{Result, TrainError};
pub use trainer::{
    state_checksum, train, DataPlan, EvalSet, ModeSpec, Observer, OptimizerSpec, Session, StepRecord,
    TrainConfig, TrainReport,
};
