//! The input thread: typed lines read plainly from standard input, or through a `rustyline`
//! editor when standard input and output are a terminal, with the terminal's mode put back
//! however the chat ends.

use std::io::{self, BufRead, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use nix::errno::Errno;
use rustyline::error::ReadlineError;
use rustyline::{Cmd, Config, DefaultEditor, KeyEvent};

use super::commands::{too_long, Commands};
use super::suspend::{
    a_read_failed_with_eio, discard_unread_input, keep_the_mode_before_chat,
    leaving_the_prompt_line, redraw_on_resume, remember_mode_before_chat,
    stop_in_the_mode_before_the_chat, take_suspend_here, EditorThread, InTheForeground,
};
use super::{lock, Event};
use crate::error::ClientError;
use crate::feed::Feed;
use crate::screen::{EditorPrinter, Screen};

/// The line editor's prompt.
const PROMPT: &str = "> ";

/// How long, in milliseconds, the line editor waits after Escape for the rest of a key's
/// sequence (an arrow key's `ESC [ A` comes in one write) before taking it as Escape alone:
/// GNU readline's `keyseq-timeout`. rustyline waits without end by default, reading keys
/// alone meanwhile, so a lone Escape held the room's lines back until the next key, and
/// made that key an Alt one.
const KEYSEQ_TIMEOUT_MS: u16 = 500;

/// The remark when the editor met a byte that is not UTF-8, and dropped the line.
const NOT_UTF8: &str =
    "* the terminal sent a byte that is not UTF-8: that line was dropped (is the terminal set to UTF-8?)";

/// What turns a terminal's bracketed paste off (rustyline writes it to standard output).
pub(super) const BRACKETED_PASTE_OFF: &[u8] = b"\x1b[?2004l";

/// The terminal mode as it was before the line editor ran, put back on drop with the
/// terminal's unread input discarded.
pub(super) struct TerminalGuard {
    saved: Option<nix::sys::termios::Termios>,
    /// Set while the editor waits for a line (the cursor is on the prompt line).
    pub(super) reading: Arc<AtomicBool>,
}

impl TerminalGuard {
    pub(super) fn save() -> TerminalGuard {
        let saved = nix::sys::termios::tcgetattr(io::stdin())
            .inspect_err(|e| debug!("cannot read the terminal mode: {e}"))
            .ok();
        if let Some(mode) = &saved {
            remember_mode_before_chat(mode);
        }
        TerminalGuard {
            saved,
            reading: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            use nix::sys::termios::{tcsetattr, SetArg};
            // The last mode set, whatever the resume thread was doing; none onto the terminal
            // of another job.
            if !keep_the_mode_before_chat() {
                debug!("the terminal is another group's; leaving its mode alone");
                return;
            }
            // TCSAFLUSH: what the terminal holds unread (the rest of a paste that waited for
            // the chat's pace, lines typed after a `/quit`) is discarded, not left to the
            // shell, which would run each pasted chat line as a command.
            if let Err(e) = tcsetattr(io::stdin(), SetArg::TCSAFLUSH, saved) {
                debug!("cannot restore the terminal mode: {e}");
            }
            discard_unread_input();
            if self.reading.load(Ordering::SeqCst) {
                // The editor turns the terminal's bracketed paste on for each line it reads
                // and off when it returns one: ended while reading, it is left on, and the
                // shell would get every paste wrapped in `ESC [200~` ... `ESC [201~`. Then
                // leave the prompt line, unless the shell's prompt stands there (see
                // `leaving_the_prompt_line`). On standard output, the terminal the editor
                // draws on: standard error may be redirected.
                let mut out = io::stdout().lock();
                let written = out
                    .write_all(leaving_the_prompt_line())
                    .and_then(|()| out.flush());
                if let Err(e) = written {
                    debug!("cannot leave the prompt line: {e}");
                }
            }
        }
    }
}

/// Starts the input thread. `reading` is set when the line editor is to be used (and is
/// the flag the terminal guard reads).
pub(super) fn spawn_input(
    mut commands: Commands,
    join_history: bool,
    reading: Option<Arc<AtomicBool>>,
) {
    let spawned = crate::threads::spawn("input", move || {
        // This thread reads the terminal and sets its mode: from the background, it is the
        // one to wait (or stop) for that (`threads::spawn`).
        crate::threads::take_terminal_signals_here();
        let editing = reading.is_some();
        let mut editor =
            reading.and_then(|reading| match start_editor(&commands.screen, &reading) {
                Ok((editor, resume)) => Some((editor, reading, resume)),
                Err(e) => {
                    warn!("line editing unavailable, reading plain lines: {e}");
                    None
                }
            });
        if editor.is_some() {
            commands.editor_prints();
            // The terminal quiet (as between two lines) before the join's history is asked
            // for, not only once the editor reads: the keys typed from then on wait unseen
            // for the editor, which draws them after its prompt. Quieted only after the asking
            // thread started, a key typed while it sent its question would be echoed raw in
            // the terminal's normal mode, before the prompt (the server test
            // `client_terminal::the_history_on_joining_comes_while_the_editor_reads`). SIGTSTP is
            // still blocked here (`take_suspend_here` is below), so a Ctrl+Z meanwhile finds
            // the handler that stops in the mode before the chat.
            stop_in_the_mode_before_the_chat();
            quiet_between_lines();
            // The editor must keep reading while the server answers `/who` or `/history`,
            // and the join's history too: fetched here, before `readline`, it left the
            // terminal in its normal mode meanwhile, which echoed what was typed raw over
            // the screen, with no prompt until the server answered.
            commands.answer_elsewhere(join_history);
        }
        if editing {
            // After every thread this one starts (the editor's printing and resume threads,
            // the asking thread), though each starts with SIGTSTP blocked whoever starts it
            // (`threads::spawn`): one that took it took the editor's Ctrl+Z as well, which
            // then returned before the process stopped. Also without the editor: this
            // thread then takes the Ctrl+Z of the terminal's own line editing.
            take_suspend_here();
        }
        if join_history && !commands.show_recent_history() {
            // The main loop ends the session.
            return;
        }
        let end = match &mut editor {
            Some((editor, reading, _)) => read_edited(&mut commands, editor, reading),
            None => read_lines(&mut commands, &mut io::stdin().lock()),
        };
        if let Some(event) = end {
            let _ = commands.events.send(event);
        }
    });
    if let Err(e) = spawned {
        // Without input we can still receive; leaving is then up to a signal.
        warn!("could not start the input thread: {e}");
    }
}

/// A line editor with in-memory history, whose external printer becomes the screen's, and
/// that takes Escape alone after [`KEYSEQ_TIMEOUT_MS`]. It draws its line again after a stop
/// it did not see while `reading` ([`redraw_on_resume`]), as long as the [`EditorThread`]
/// returned with it is kept (on the calling thread, which the editor must read on).
///
/// Ctrl+R and Ctrl+S search the history by prefix: the previous (next) line starting with
/// what is typed before the cursor. rustyline binds them to its incremental search, whose
/// loop reads keys alone: the external printer is not served until the search ends, so the
/// room's lines were held back (and, past the feed's bound, the socket's) for as long as
/// the search prompt stayed open.
///
/// Ctrl+V and Ctrl+Q do nothing: rustyline's quoted insert also reads the next key alone,
/// holding the room's lines back until then, and makes that key text. The text it makes is
/// of no use in a chat (control characters reach the others as escapes) and a trap: Ctrl+V
/// (a paste, to a hand used to other programs) then a paste sent `ESC [200~` with it, and
/// Ctrl+Q (a terminal's XON) then Enter put a carriage return in the line, which made the
/// `/quit` typed after it a message.
///
/// Ctrl+X and Ctrl+] do nothing too: they were prefixes that read a second key alone in the
/// same way (Ctrl+X Ctrl+U, which Ctrl+_ still does; a character search), so the room's
/// lines waited for it, and it was taken: Ctrl+X then Enter sent nothing. (Alt with a digit,
/// a count for the next key, reads keys alone as well, but shows its `(arg: N)` prompt and
/// cannot be bound otherwise.)
fn start_editor(
    screen: &Mutex<Screen>,
    reading: &Arc<AtomicBool>,
) -> Result<(DefaultEditor, Option<EditorThread>), ReadlineError> {
    let config = Config::builder()
        .keyseq_timeout(Some(KEYSEQ_TIMEOUT_MS))
        .build();
    let mut editor = DefaultEditor::with_config(config)?;
    editor.bind_sequence(KeyEvent::ctrl('R'), Cmd::HistorySearchBackward);
    editor.bind_sequence(KeyEvent::ctrl('S'), Cmd::HistorySearchForward);
    editor.bind_sequence(KeyEvent::ctrl('V'), Cmd::Noop);
    editor.bind_sequence(KeyEvent::ctrl('Q'), Cmd::Noop);
    editor.bind_sequence(KeyEvent::ctrl('X'), Cmd::Noop);
    editor.bind_sequence(KeyEvent::ctrl(']'), Cmd::Noop);
    let feed = Feed::start(InTheForeground(editor.create_external_printer()?))?;
    let resume = redraw_on_resume(feed.clone(), Arc::clone(reading))
        .inspect_err(|e| debug!("the line will not be drawn again after a stop: {e}"))
        .ok();
    lock(screen).set_editor_printer(Box::new(EditorPrinter::new(feed)));
    Ok((editor, resume))
}

/// Acts on each line of `input`; returns the event that ends the input, or `None` when
/// `/quit` already told the main loop. A line too long to be sent is skipped with a
/// complaint, without ever being held whole.
pub(super) fn read_lines(commands: &mut Commands, input: &mut impl BufRead) -> Option<Event> {
    // The longest line that may be sent: a message escaped with one more '/', then "\r\n".
    let limit = commands.max_message_len + 3;
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match input
            .by_ref()
            .take(limit as u64)
            .read_until(b'\n', &mut raw)
        {
            Ok(0) => return Some(Event::Eof),
            Ok(n) if n == limit && raw.last() != Some(&b'\n') => {
                if let Err(source) = input.skip_until(b'\n') {
                    if hung_up(&source) {
                        return Some(Event::Eof);
                    }
                    return Some(Event::Failed(ClientError::Io {
                        context: "reading standard input",
                        source,
                    }));
                }
                commands.err(&too_long(commands.max_message_len));
            }
            Ok(_) => {
                let line = String::from_utf8_lossy(&raw);
                if !commands.handle_line(&line) {
                    return None;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if hung_up(&e) => return Some(Event::Eof),
            Err(source) => {
                return Some(Event::Failed(ClientError::Io {
                    context: "reading standard input",
                    source,
                }))
            }
        }
    }
}

/// Whether a read failed because the terminal hung up (its window closed, an SSH connection
/// lost): the end of the input, as the SIGHUP that comes with it says, not a failure.
fn hung_up(error: &io::Error) -> bool {
    error.raw_os_error() == Some(Errno::EIO as i32)
}

/// Makes the terminal's mode between two lines quiet: without echo and without its own line
/// editing (ECHO, ICANON and IEXTEN off, as in the editor's raw mode). rustyline sets raw
/// mode for each line it reads and, between two lines, puts back the mode it found: the
/// terminal's normal one, which echoed the keys typed in that instant (while the line just
/// entered is handed over, which waits for the chat's pace under a paste of many lines) raw
/// on the screen, Enter included, before the editor read and drew them again. With this
/// mode found, they wait unseen for the next line, as typed. Signals (ISIG) and output
/// processing stay as they were; the terminal guard puts the whole mode back at the end.
fn quiet_between_lines() {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let quieted = tcgetattr(io::stdin()).and_then(|mut mode| {
        mode.local_flags
            .remove(LocalFlags::ECHO | LocalFlags::ICANON | LocalFlags::IEXTEN);
        tcsetattr(io::stdin(), SetArg::TCSADRAIN, &mode)
    });
    if let Err(e) = quieted {
        debug!("cannot quiet the terminal between two lines: {e}");
    }
}

/// The line editor's loop: Enter acts on the line, Ctrl+C and Ctrl+D leave. The terminal is
/// already quiet between lines, and SIGTSTP stops in the mode before the chat (`spawn_input`).
fn read_edited(
    commands: &mut Commands,
    editor: &mut DefaultEditor,
    reading: &AtomicBool,
) -> Option<Event> {
    loop {
        reading.store(true, Ordering::SeqCst);
        let line = editor.readline(PROMPT);
        reading.store(false, Ordering::SeqCst);
        match line {
            Ok(line) => {
                if !line.trim().is_empty() {
                    if let Err(e) = editor.add_history_entry(line.as_str()) {
                        debug!("line not kept in the history: {e}");
                    }
                }
                if !handle_edited(commands, &line) {
                    return None;
                }
            }
            Err(error) => {
                if let Some(end) = after_a_failed_read(commands, error) {
                    return Some(end);
                }
            }
        }
    }
}

/// What the input does once the editor's read failed with `error`: the event that ends it
/// (Ctrl+C, the end of input, a terminal hung up, any other failure), or `None` to read on
/// (a byte that is not UTF-8, told of on the spot).
pub(super) fn after_a_failed_read(commands: &Commands, error: ReadlineError) -> Option<Event> {
    match error {
        ReadlineError::Interrupted => Some(Event::Quit),
        ReadlineError::Eof => Some(Event::Eof),
        // The editor reads UTF-8 only and gives up the line at the first byte that is
        // not; the terminal is still there to read (plain lines take such bytes as U+FFFD).
        ReadlineError::Io(e) if e.kind() == io::ErrorKind::InvalidData => {
            commands.err(NOT_UTF8);
            None
        }
        // The terminal hung up (see `hung_up`), or, from the background, the kernel says the
        // process group is orphaned.
        ReadlineError::Errno(Errno::EIO) => {
            a_read_failed_with_eio();
            Some(Event::Eof)
        }
        ReadlineError::Io(e) if hung_up(&e) => Some(Event::Eof),
        e => Some(Event::Failed(ClientError::Io {
            context: "reading the terminal",
            source: io::Error::other(e.to_string()),
        })),
    }
}

/// Acts on a line the editor returned. A paste (rustyline turns on the terminal's bracketed
/// paste) keeps its line breaks in the edited text, so each of its lines is acted on in turn,
/// as if piped; returns `false` when input should stop ([`Commands::handle_line`]).
pub(super) fn handle_edited(commands: &mut Commands, edited: &str) -> bool {
    edited.split('\n').all(|line| commands.handle_line(line))
}
