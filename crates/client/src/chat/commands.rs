//! The chat's local commands (`/help`, `/who`, `/history`), read on the input thread; chat
//! text and `/quit` go to the main loop.
//!
//! `/who` and `/history` are questions to the server, each on a short-lived TCP connection
//! ([`Asker`]), whose answer may take up to
//! [`HANDSHAKE_TIMEOUT`](crate::handshake::HANDSHAKE_TIMEOUT). With plain lines they are
//! answered on the input thread, in turn with the lines around them, so that a script reads
//! each answer before what it sends next. With the line editor they go to an *asking* thread
//! ([`Commands::answer_elsewhere`]), which answers them in the order asked: the editor keeps
//! reading meanwhile. The input thread must not wait for them there: the terminal would go back
//! to its normal mode, echo raw whatever is typed, and the room's lines would be written after
//! it, with nothing saying that the client waits. Either way an answer slow to come is
//! announced with [`ASKING`].

use std::net::SocketAddr;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{debug, warn};
use tcrp::ErrorCode;

use super::checks::gone_line;
use super::{lock, remark, Ahead, Event};
use crate::error::ClientError;
use crate::handshake::Token;
use crate::input::{self, Input};
use crate::query::{self, HistoryPager, DEFAULT_HISTORY_LIMIT};
use crate::render::{printable, Flow};
use crate::screen::Screen;
use crate::{closure, listing};

/// Said when `/history` reaches the oldest message kept: the next `/history` shows the latest
/// again.
const NO_MORE_HISTORY: &str = "* no more history (/history again starts from the latest)";

/// The remark for a `/who` or `/history` (`command`) that got `error` instead of an answer.
/// A server that says nothing in time, or closes without a word, is said to in plain words:
/// the handshake's own message talks of frames and asks whether the port is the handshake
/// one, which the join has just shown it is.
pub(super) fn unanswered(command: &str, error: &ClientError) -> String {
    match error {
        ClientError::HandshakeTimeout { after, .. } => {
            format!(
                "* {command}: the server did not answer within {} s",
                after.as_secs()
            )
        }
        ClientError::HandshakeClosed { .. } => {
            format!("* {command}: the server closed the connection without an answer")
        }
        other => format!("* {other}"),
    }
}

/// What is said when the server has not answered `/who` or `/history` within
/// [`ASKING_REMARK_AFTER`].
pub(super) const ASKING: &str = "* asking the server\u{2026}";

/// How long the server may take to answer `/who` or `/history` before [`ASKING`] says that
/// the client waits for it: a local server answers within milliseconds.
const ASKING_REMARK_AFTER: Duration = Duration::from_secs(1);

/// Questions that may wait for the asking thread; one more is refused with a remark rather
/// than waited for, which would stop the line editor.
const QUESTIONS_QUEUED: usize = 8;

/// A question to the server typed in the chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Question {
    /// `/who`.
    Who,
    /// `/history N`.
    History {
        /// How many messages to ask for.
        count: u32,
    },
}

/// Who answers [`Question`]s.
enum Answerer {
    /// The input thread itself, as it reads them.
    Here(Asker),
    /// The asking thread, through its queue.
    Elsewhere(SyncSender<Question>),
}

/// What the input thread needs to act on typed lines: local commands are answered here (or
/// by the asking thread), chat text and `/quit` are passed to the main loop.
pub(super) struct Commands {
    pub(super) screen: Arc<Mutex<Screen>>,
    /// The main loop's queue of lines to send: chat text, `/quit` and the end of input, in
    /// the order read.
    pub(super) events: SyncSender<Event>,
    /// The longest chat message that can be sent ([`Session::max_message_len`](super::Session::max_message_len)).
    pub(super) max_message_len: usize,
    /// The server is the original one: `/who` and `/history` are not asked.
    pub(super) original: bool,
    /// The line editor prints (see [`Asker::editor`]).
    editor: bool,
    answerer: Answerer,
}

/// What asking the server `/who` and `/history` takes, and where `/history` stands.
#[derive(Clone)]
pub(super) struct Asker {
    /// The daemon's TCP address.
    pub(super) tcp: SocketAddr,
    pub(super) room_name: String,
    pub(super) token: Token,
    pub(super) pager: HistoryPager,
    pub(super) screen: Arc<Mutex<Screen>>,
    /// Where the server's word that the session is over goes: ahead of the queued lines,
    /// which would go to a room that no longer holds us.
    pub(super) events: Ahead,
    /// The line editor prints: remarks wait for the screen, which is never held for long,
    /// and are drawn above the line being typed. Else (plain lines) they do not wait for it
    /// ([`remark_unheld`](super::remark_unheld)).
    pub(super) editor: bool,
}

impl Commands {
    /// Commands answering questions on the input thread, until [`Commands::answer_elsewhere`];
    /// chat text and `/quit` go to `events`, the main loop's queue of lines.
    pub(super) fn new(
        asker: Asker,
        events: SyncSender<Event>,
        max_message_len: usize,
        original: bool,
    ) -> Commands {
        Commands {
            screen: Arc::clone(&asker.screen),
            events,
            max_message_len,
            original,
            editor: asker.editor,
            answerer: Answerer::Here(asker),
        }
    }

    /// The line editor prints from now on: remarks wait for the screen ([`Asker::editor`]).
    pub(super) fn editor_prints(&mut self) {
        self.editor = true;
        if let Answerer::Here(asker) = &mut self.answerer {
            asker.editor = true;
        }
    }

    /// From now on `/who` and `/history` are answered on an asking thread of their own, in
    /// the order asked, and the input thread goes on reading at once: for the line editor,
    /// which must keep the terminal while the server takes its time. With `join_history`
    /// that thread first fetches and shows the join's history ([`Asker::show_recent_history`]),
    /// before any question typed meanwhile. Should the thread not start, all of it is
    /// answered here as before ([`Commands::show_recent_history`] included).
    pub(super) fn answer_elsewhere(&mut self, join_history: bool) {
        let Answerer::Here(asker) = &self.answerer else {
            return;
        };
        let (questions, asked) = mpsc::sync_channel(QUESTIONS_QUEUED);
        let mut asker = asker.clone();
        let spawned = crate::threads::spawn("asking", move || {
            if join_history && !asker.show_recent_history() {
                // The main loop ends the session.
                return;
            }
            for question in asked {
                if !asker.answer(question) {
                    // The main loop ends the session.
                    return;
                }
            }
        });
        match spawned {
            Ok(_) => self.answerer = Answerer::Elsewhere(questions),
            Err(e) => warn!("could not start the asking thread: {e}"),
        }
    }

    /// Acts on one typed line; returns `false` when input should stop (after `/quit`, or
    /// when the main loop is gone).
    pub(super) fn handle_line(&mut self, line: &str) -> bool {
        match input::classify(line) {
            Input::Send(text) => return self.events.send(Event::Send(text.to_owned())).is_ok(),
            Input::Quit => {
                let _ = self.events.send(Event::Quit);
                return false;
            }
            Input::Help if self.original => self.err(input::HELP_ORIGINAL),
            Input::Help => self.err(input::HELP),
            Input::Who | Input::History { .. } if self.original => self.err(input::NOT_ORIGINAL),
            Input::Who => return self.ask(Question::Who),
            Input::History { count } => return self.ask(Question::History { count }),
            Input::Usage(text) => self.err(text),
            Input::Unknown(command) => {
                self.err(&format!(
                    "* unknown command {} (try /help)",
                    printable(command)
                ));
            }
            Input::Reserved => self.err("* reserved word not sent"),
            Input::Empty => {}
        }
        true
    }

    pub(super) fn err(&self, line: &str) {
        remark(&self.screen, self.editor, line);
    }

    /// Gets `question` answered, here or by the asking thread; `false` when the session ends.
    fn ask(&mut self, question: Question) -> bool {
        match &mut self.answerer {
            Answerer::Here(asker) => asker.answer(question),
            Answerer::Elsewhere(questions) => {
                match questions.try_send(question) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => self.err(&format!(
                        "* not asked: {QUESTIONS_QUEUED} questions already wait for the server"
                    )),
                    // The asking thread ended: the server said we are not in the room, and
                    // the main loop is ending the session.
                    Err(TrySendError::Disconnected(_)) => {
                        debug!("{question:?} not asked: the session ends")
                    }
                }
                true
            }
        }
    }

    /// On join: see [`Asker::show_recent_history`], here on the input thread unless the
    /// asking thread took it ([`Commands::answer_elsewhere`]).
    pub(super) fn show_recent_history(&mut self) -> bool {
        match &mut self.answerer {
            Answerer::Here(asker) => asker.show_recent_history(),
            Answerer::Elsewhere(_) => true,
        }
    }
}

impl Asker {
    fn err(&self, line: &str) {
        remark(&self.screen, self.editor, line);
    }

    /// Answers one question; `false` when the session ends.
    fn answer(&mut self, question: Question) -> bool {
        match question {
            Question::Who => self.who(),
            Question::History { count } => self.history(count),
        }
    }

    /// The server answered `error`: if it says we are no longer in the room, tells the main
    /// loop to end the session and returns `false` (no more questions are answered); else
    /// shows it.
    fn refused(&self, command: &str, error: &ClientError) -> bool {
        if closure::is_gone(error) {
            let line = gone_line(&self.room_name, error);
            let _ = self.events.send(Event::Gone(line));
            return false;
        }
        self.err(&unanswered(command, error));
        true
    }

    /// `/who`: the room's host and members, as remarks. `false` when the session ends.
    fn who(&mut self) -> bool {
        let (tcp, room_name, token) = (self.tcp, self.room_name.clone(), self.token.clone());
        let answer = waiting(
            |line| self.err(line),
            move || query::presence_at(tcp, &room_name, Some(&token), None),
        );
        match answer {
            Ok(presence) => {
                let lines = listing::presence_lines(&presence);
                if self.editor {
                    // Together, with no other line among them.
                    let mut screen = lock(&self.screen);
                    for line in lines {
                        screen.err(&format!("* {line}"));
                    }
                } else {
                    for line in lines {
                        self.err(&format!("* {line}"));
                    }
                }
                true
            }
            Err(e) => self.refused("/who", &e),
        }
    }

    /// `/history N`: the next page back, oldest first, then `* no more history` at the end;
    /// after that, the latest again. `false` when the session ends.
    fn history(&mut self, count: u32) -> bool {
        let before = self.pager.next();
        let (tcp, room_name, token) = (self.tcp, self.room_name.clone(), self.token.clone());
        let page = waiting(
            |line| self.err(line),
            move || query::history_at(tcp, &room_name, &token, before, count),
        );
        let page = match page {
            Ok(page) => page,
            Err(e) => return self.refused("/history", &e),
        };
        let more = self.pager.observe(before, &page);
        let mut screen = lock(&self.screen);
        for message in &page.messages {
            if let Err(e) = screen.out(&listing::history_line(message)) {
                warn!("cannot print the history: {e}");
                return true;
            }
        }
        if !more {
            screen.err(NO_MORE_HISTORY);
        }
        true
    }

    /// On join: fetches the latest messages and releases the screen with them; `/history`
    /// then pages back from the oldest of them. A server without the extension (the original
    /// one) is passed over in silence. `false` when the session ends (the server says we are
    /// not in the room).
    pub(super) fn show_recent_history(&mut self) -> bool {
        let fetched = query::history_at(
            self.tcp,
            &self.room_name,
            &self.token,
            None,
            DEFAULT_HISTORY_LIMIT,
        );
        let page = match fetched {
            Ok(page) => {
                // An empty room's page says nothing of what `/history` will find later.
                if !page.messages.is_empty() {
                    self.pager.observe(None, &page);
                }
                Some(page)
            }
            Err(ClientError::QueryRefused {
                code: Some(ErrorCode::UnsupportedOperation),
                ..
            }) => {
                debug!("the server keeps no history");
                None
            }
            Err(e) if closure::is_gone(&e) => {
                // Gone before we could even look: the session ends (the main loop prints
                // the line; the screen stays held, so nothing else shows).
                let _ = self
                    .events
                    .send(Event::Gone(gone_line(&self.room_name, &e)));
                return false;
            }
            Err(e) => {
                self.err(&format!("* history unavailable: {e}"));
                None
            }
        };
        let released = lock(&self.screen).release(page.as_ref());
        let event = match released {
            Ok(Flow::Continue) => return true,
            Ok(Flow::RoomClosed) => Event::RoomClosed,
            Err(source) => Event::Failed(ClientError::Io {
                context: "writing to standard output",
                source,
            }),
        };
        let _ = self.events.send(event);
        true
    }
}

/// Runs `ask`, a question to the server, on a thread of its own and waits for its answer,
/// saying [`ASKING`] with `say` if that takes longer than [`ASKING_REMARK_AFTER`]: the server
/// may take up to [`HANDSHAKE_TIMEOUT`](crate::handshake::HANDSHAKE_TIMEOUT), which should
/// not look like nothing happening.
pub(super) fn waiting<T: Send + 'static>(
    say: impl FnOnce(&str),
    ask: impl FnOnce() -> Result<T, ClientError> + Send + 'static,
) -> Result<T, ClientError> {
    let (answer, answered) = mpsc::sync_channel(1);
    crate::threads::spawn("question", move || {
        // The caller waits for the answer, or has gone with the process.
        let _ = answer.send(ask());
    })
    .map_err(ClientError::io("starting a thread to ask the server"))?;
    match answered.recv_timeout(ASKING_REMARK_AFTER) {
        Ok(answer) => return answer,
        Err(mpsc::RecvTimeoutError::Timeout) => say(ASKING),
        Err(mpsc::RecvTimeoutError::Disconnected) => {}
    }
    answered.recv().unwrap_or_else(|_| {
        Err(ClientError::io("asking the server")(std::io::Error::other(
            "the thread asking it ended without an answer",
        )))
    })
}

/// The complaint about a message over `max` bytes, which is not sent.
pub(super) fn too_long(max: usize) -> String {
    format!("* message not sent: too long (at most {max} bytes of UTF-8 fit one message)")
}
