//! Training progress: an indicatif bar on a terminal; on a pipe or a log
//! file no bar, only the checkpoint lines.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
    interactive: bool,
}

impl Progress {
    /// A bar over steps `0..total`, already at `start` (a resumed run).
    pub fn new(total: usize, start: usize) -> Self {
        let interactive = std::io::stdout().is_terminal();
        let bar = if interactive {
            ProgressBar::new(total as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        bar.set_position(start as u64);
        bar.reset_eta();
        bar.enable_steady_tick(Duration::from_millis(250));
        Progress { bar, interactive }
    }

    /// Moves to `step` (steps done) and shows `status` (epoch, losses, speed).
    pub fn update(&self, step: usize, status: String) {
        self.bar.set_position(step as u64);
        self.bar.set_message(status);
    }

    /// `items` more done; callable from any thread.
    pub fn advance(&self, items: usize) {
        self.bar.inc(items as u64);
    }

    /// Prints a line above the bar, or plainly when there is no bar.
    pub fn println(&self, line: &str) {
        if self.interactive {
            self.bar.println(line);
        } else {
            println!("{line}");
        }
    }

    pub fn finish(&self) {
        self.bar.finish();
    }
}
