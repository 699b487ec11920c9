//! What the library tests share: a client driven from the test.

// Each test file uses its own part of this.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use meshlink_chat::client::{self, ClientConfig, ClientEvent};
use meshlink_chat::protocol::Nick;

/// How long a test waits for anything.
pub const WAIT: Duration = Duration::from_secs(5);

/// A [`client::run`] fed and watched by the test.
pub struct Client {
    pub input: Option<mpsc::Sender<String>>,
    events: mpsc::UnboundedReceiver<ClientEvent>,
    task: JoinHandle<()>,
}

impl Client {
    pub fn start(addr: SocketAddr, nick: &str) -> Client {
        let mut config = ClientConfig::new(addr, Nick::parse(nick).unwrap());
        config.linger = Duration::from_millis(100);
        let (input, lines) = mpsc::channel(16);
        let (events_tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            client::run(&config, lines, |event| {
                let _ = events_tx.send(event);
            })
            .await;
        });
        Client {
            input: Some(input),
            events,
            task,
        }
    }

    pub async fn say(&self, line: &str) {
        self.input
            .as_ref()
            .unwrap()
            .send(line.to_string())
            .await
            .unwrap();
    }

    /// Waits for an event matching `wanted`, returning the events before it.
    pub async fn expect(&mut self, wanted: impl Fn(&ClientEvent) -> bool) -> Vec<ClientEvent> {
        let mut before = Vec::new();
        loop {
            match timeout(WAIT, self.events.recv()).await {
                Ok(Some(event)) if wanted(&event) => return before,
                Ok(Some(event)) => before.push(event),
                other => panic!("no matching event ({other:?}); before it: {before:?}"),
            }
        }
    }

    pub async fn expect_line(&mut self, line: &str) -> Vec<ClientEvent> {
        self.expect(|e| *e == ClientEvent::Line(line.to_string()))
            .await
    }

    pub async fn finish(mut self) {
        self.input.take();
        timeout(WAIT, self.task).await.unwrap().unwrap();
    }
}

pub fn is_connected(event: &ClientEvent) -> bool {
    matches!(event, ClientEvent::Connected(_))
}

pub fn is_disconnected(event: &ClientEvent) -> bool {
    matches!(event, ClientEvent::Disconnected(_))
}
