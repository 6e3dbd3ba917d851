//! Progress lines on stderr: one line per step as it starts, so that someone waiting sees what
//! the converter is doing (the result goes to stdout; JSON output stays clean).

use std::io::Write;

/// Say that a step starts: `rehost-converter: inspecting partitions…`.
pub fn step(what: &str) {
    let _ = writeln!(std::io::stderr(), "rehost-converter: {what}…");
}

/// A progress note within a step (how long it took, what it still waits for), without the
/// step's ellipsis.
pub fn note(what: &str) {
    let _ = writeln!(std::io::stderr(), "rehost-converter: {what}");
}

/// Whether stderr is a terminal (for tools' own progress meters, which redraw one line).
pub fn stderr_is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}
