//! MeZO core math: seeds, the perturbation Z, estimator math, optimizers, schedules; no IO.
//!
//! Everything here is a pure function of its arguments. In particular the perturbation
//! `Z[seed, name, i]` is defined bit for bit (see [`rng`]) so that a run can be replayed from its
//! seeds alone, on CPU or CUDA, in any process, without storing a single Z.

pub mod cuda;
pub mod error;
pub mod fused;
pub mod graph;
pub mod normal;
pub mod ops;
pub mod rng;
pub mod seeds;
pub mod ztensor;

pub use error::{CoreError, Result};
pub use rng::{
    gaussian_of_bits, host_gauss_table, mix32, name_hash, rademacher_of_bits, uniform_host, uniform_of_bits,
    z_host, Distribution, HostGaussTable, StreamKey, GAUSS_TABLE_LEN,
};
pub use seeds::{direction_seed, splitmix64, HostRng};
pub use ztensor::{
    bits_tensor, gaussian_from_bits, rademacher_from_bits, uniform_from_bits, z_from_bits, z_tensor,
    GaussTable,
};
