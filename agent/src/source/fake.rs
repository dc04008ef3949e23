//! A source fed by the test: candidates are layouts pushed into a channel.

use super::{BoxFuture, Candidate, Ingested, Source, SourceError};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

pub struct FakeSource {
    receiver: mpsc::UnboundedReceiver<Result<Candidate, SourceError>>,
    /// Outcomes in order, for assertions.
    pub settled: Arc<Mutex<Vec<(String, Ingested)>>>,
}

pub type FakeSender = mpsc::UnboundedSender<Result<Candidate, SourceError>>;

impl FakeSource {
    pub fn new() -> (FakeSource, FakeSender) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (
            FakeSource {
                receiver,
                settled: Arc::default(),
            },
            sender,
        )
    }
}

impl Source for FakeSource {
    fn describe(&self) -> String {
        "fake".into()
    }

    fn next(&mut self) -> BoxFuture<'_, Result<Candidate, SourceError>> {
        Box::pin(async move {
            match self.receiver.recv().await {
                Some(item) => item,
                None => std::future::pending().await,
            }
        })
    }

    fn settle(&mut self, candidate: Candidate, outcome: &Ingested) -> BoxFuture<'_, ()> {
        let entry = (candidate.key, outcome.clone());
        Box::pin(async move {
            if let Ok(mut settled) = self.settled.lock() {
                settled.push(entry);
            }
        })
    }
}
