//! The unit tests' logger: what a test's own thread logs, captured for its assertions.

/// What this thread logs while `f` runs: (level, line). The unit tests' only logger; it
/// keeps nothing from other threads, so tests running beside this one do not mix in.
pub(crate) fn logged(f: impl FnOnce()) -> Vec<(log::Level, String)> {
    use std::cell::RefCell;
    thread_local! {
        static LINES: RefCell<Option<Vec<(log::Level, String)>>> = const { RefCell::new(None) };
    }
    struct Capture;
    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, record: &log::Record) {
            let _ = LINES.try_with(|lines| {
                if let Some(lines) = lines.borrow_mut().as_mut() {
                    lines.push((record.level(), record.args().to_string()));
                }
            });
        }
        fn flush(&self) {}
    }
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&Capture).expect("no other logger in the unit tests");
        log::set_max_level(log::LevelFilter::Trace);
    });
    LINES.with(|lines| *lines.borrow_mut() = Some(Vec::new()));
    f();
    LINES.with(|lines| lines.borrow_mut().take().unwrap_or_default())
}
