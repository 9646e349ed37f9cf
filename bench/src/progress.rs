//! A run's progress on stderr, once a second: an indicatif bar on a
//! terminal; in a log (CI, `cargo xtask bench` capturing it) a line each
//! time, since a bar there would be hidden or drawn as noise.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
    ticker: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// Starts reporting on a run of `total` units. `status` says how many are
    /// done and describes the run so far ("120/200 booted, 0 failed, 3 s").
    pub fn start(total: u64, status: impl Fn() -> (u64, String) + Send + 'static) -> Self {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("bench: {wide_bar} {msg}")
                .expect("a valid progress template"),
        );
        let ticker = tokio::spawn({
            let bar = bar.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let (done, text) = status();
                    if bar.is_hidden() {
                        eprintln!("bench: {text}");
                    } else {
                        bar.set_position(done);
                        bar.set_message(text);
                    }
                }
            }
        });
        Self { bar, ticker }
    }

    /// Stops reporting and clears the bar, so the report follows cleanly.
    pub fn finish(self) {
        self.ticker.abort();
        self.bar.finish_and_clear();
    }
}
