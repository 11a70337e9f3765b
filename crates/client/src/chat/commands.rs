//! The chat's local commands (`/help`, `/who`, `/history`), answered on the input thread,
//! each query on a short-lived TCP connection; chat text and `/quit` go to the main loop.

use std::net::SocketAddr;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use tcrp::payload::HistoryPage;
use tcrp::ErrorCode;

use super::checks::gone_line;
use super::{lock, Event};
use crate::error::ClientError;
use crate::handshake::{self, Token};
use crate::input::{self, Input};
use crate::query::{self, HistoryPager, PageRequest, DEFAULT_HISTORY_LIMIT};
use crate::render::{printable, Flow};
use crate::screen::Screen;
use crate::{closure, listing};

/// What the input thread needs to act on typed lines: local commands are answered here,
/// chat text and `/quit` are passed to the main loop.
pub(super) struct Commands {
    /// The daemon's TCP address.
    pub(super) tcp: SocketAddr,
    pub(super) room_name: String,
    pub(super) token: Token,
    pub(super) pager: HistoryPager,
    pub(super) screen: Arc<Mutex<Screen>>,
    pub(super) events: SyncSender<Event>,
    /// The longest chat message that can be sent ([`Session::max_message_len`](super::Session::max_message_len)).
    pub(super) max_message_len: usize,
    /// The server is the original one: `/who` and `/history` are not asked.
    pub(super) original: bool,
}

impl Commands {
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
            Input::Who => return self.who(),
            Input::History { count } => return self.history(count),
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
        lock(&self.screen).err(line);
    }

    /// The server answered `error`: if it says we are no longer in the room, tells the main
    /// loop to end the session and returns `false` (input stops); else shows it.
    fn refused(&self, error: &ClientError) -> bool {
        if closure::is_gone(error) {
            let line = gone_line(&self.room_name, error);
            let _ = self.events.send(Event::Gone(line));
            return false;
        }
        self.err(&format!("* {error}"));
        true
    }

    /// `/who`: the room's host and members, as remarks. `false` when the session ends.
    fn who(&mut self) -> bool {
        let answer = handshake::connect_addr(self.tcp).and_then(|mut stream| {
            query::presence(&mut stream, &self.room_name, Some(&self.token), None)
        });
        match answer {
            Ok(presence) => {
                let mut screen = lock(&self.screen);
                for line in listing::presence_lines(&presence) {
                    screen.err(&format!("* {line}"));
                }
                true
            }
            Err(e) => self.refused(&e),
        }
    }

    /// `/history N`: the next page back, oldest first, then `* no more history` at the end.
    /// `false` when the session ends.
    fn history(&mut self, count: u32) -> bool {
        let before = match self.pager.next() {
            PageRequest::Fetch { before } => before,
            PageRequest::Exhausted => {
                self.err("* no more history");
                return true;
            }
        };
        let page = match self.fetch_history(before, count) {
            Ok(page) => page,
            Err(e) => return self.refused(&e),
        };
        let more = self.pager.observe(&page);
        let mut screen = lock(&self.screen);
        for message in &page.messages {
            if let Err(e) = screen.out(&listing::history_line(message)) {
                warn!("cannot print the history: {e}");
                return true;
            }
        }
        if !more {
            screen.err("* no more history");
        }
        true
    }

    fn fetch_history(&self, before: Option<u64>, limit: u32) -> Result<HistoryPage, ClientError> {
        let mut stream = handshake::connect_addr(self.tcp)?;
        query::history(&mut stream, &self.room_name, &self.token, before, limit)
    }

    /// On join: fetches the latest messages and releases the screen with them; `/history`
    /// then pages back from the oldest of them. A server without the extension (the original
    /// one) is passed over in silence. `false` when the session ends (the server says we are
    /// not in the room).
    pub(super) fn show_recent_history(&mut self) -> bool {
        let page = match self.fetch_history(None, DEFAULT_HISTORY_LIMIT) {
            Ok(page) => {
                // An empty room's page says nothing of what `/history` will find later.
                if !page.messages.is_empty() {
                    self.pager.observe(&page);
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

/// The complaint about a message over `max` bytes, which is not sent.
pub(super) fn too_long(max: usize) -> String {
    format!("* message not sent: too long (at most {max} bytes of UTF-8 fit one message)")
}
