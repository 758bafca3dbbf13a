//! The coordinator of the MeZO service. [`dispatch`] is its scheduling core: worker leases, task
//! assignment and reassignment, exactly-once results, and the aggregation of a step's losses into
//! projected gradients. It is pure logic over an explicit clock, so every failure the service must
//! survive (a worker that dies, a result that arrives late or twice) is tested deterministically;
//! the gRPC services drive it.

pub mod auth;
pub mod commit;
pub mod dispatch;
pub mod fleet;
pub mod metrics;
pub mod paths;
pub mod server;

pub use dispatch::{Completion, Dispatcher, StepLosses, TaskKind, TaskResult, TaskSpec, WorkerId};
