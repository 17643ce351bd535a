//! What a command ends with: its text and its exit status. The statuses are the CLI's
//! contract with scripts and CI (README, "The CLI"):
//!
//! | status | meaning |
//! |---|---|
//! | 0 | done; `config validate`: every file is valid; `config diff`: no difference |
//! | 1 | the controller refused (its error printed as `status: field: message`), it could not be reached, or a file is invalid (`file: field: message`) |
//! | 2 | a usage error: an unknown command or flag, a bad value, a file that cannot be read |
//! | 3 | `config diff`: applying the file would change the live configuration |

use std::fmt;

pub const SUCCESS: u8 = 0;
pub const REFUSED: u8 = 1;
pub const USAGE: u8 = 2;
pub const DIFFERENT: u8 = 3;

/// A command that ran: what it prints on standard output, and its status (0, or 3 for a
/// `config diff` that found differences).
#[derive(Debug)]
pub struct Done {
    pub text: String,
    pub code: u8,
}

impl Done {
    pub fn ok(text: impl Into<String>) -> Done {
        Done {
            text: text.into(),
            code: SUCCESS,
        }
    }
}

/// A command that did not do what it was asked: the message for standard error and the
/// status (1 refused or invalid, 2 usage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub message: String,
    pub code: u8,
}

impl Failure {
    /// Refused by the controller, the controller out of reach, or an invalid file: 1.
    pub fn refused(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            code: REFUSED,
        }
    }

    /// The command line asks for something that cannot be done as asked: 2.
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            code: USAGE,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}
