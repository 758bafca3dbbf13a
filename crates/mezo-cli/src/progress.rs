//! The progress bar `mezo train` and `mezo run watch` draw on stderr (hidden when stderr is not
//! a terminal): position, steps/s, elapsed time, ETA and the caller's message (loss, dev accuracy).

use indicatif::{ProgressBar, ProgressStyle};

pub fn step_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {per_sec}  elapsed {elapsed_precise}  ETA {eta_precise}  {msg}",
        )
        .expect("valid template"),
    );
    bar
}
