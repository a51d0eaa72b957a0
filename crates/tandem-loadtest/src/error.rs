//! Why a run could not start or could not finish setting up. Errors during the run (server
//! error codes, closed connections) are counted in the report instead.

/// A run that cannot go ahead: bad options, no tokens, or a setup step that failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The options do not make a runnable scenario.
    #[error("invalid options: {0}")]
    Options(String),
    /// Tokens cannot be minted or read.
    #[error("tokens: {0}")]
    Tokens(String),
    /// A step every later step depends on failed (the first connection, a dataset's setup
    /// write, its grants).
    #[error("setup failed: {0}")]
    Setup(String),
}
