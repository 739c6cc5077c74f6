//! Frames a client sends.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Store a message; answered with `ack` once committed.
    Send {
        session_id: String,
        client_id: String,
        content: String,
    },
    /// Subscribe to a conversation and replay every stored message after `after_seq`.
    Resume { session_id: String, after_seq: i64 },
    /// The sender is typing (or stopped).
    Typing {
        session_id: String,
        #[serde(default = "yes")]
        active: bool,
    },
    /// Cancel the AI answer being written in this conversation.
    Stop { session_id: String },
    /// Stop receiving a conversation's events.
    Leave { session_id: String },
    /// Application-level keepalive; answered with `pong`.
    Ping {
        #[serde(default)]
        nonce: Option<serde_json::Value>,
    },
    /// Staff: follow a conversation (history, then live), answered with `watching`.
    Watch { session_id: String },
    /// Staff: stop following a conversation, answered with `unwatched`.
    Unwatch { session_id: String },
    /// Staff: take the conversation over from the AI.
    Takeover { session_id: String },
    /// Staff: hand the conversation back to the AI.
    Release { session_id: String },
    /// Staff: close the conversation.
    Close { session_id: String },
    /// Staff: soft-delete the conversation.
    Delete { session_id: String },
    /// Staff: restore a soft-deleted conversation.
    Restore { session_id: String },
    /// Customer: ask for a human agent.
    RequestHuman { session_id: String },
}

impl ClientFrame {
    /// Frames only agents and admins may send.
    pub fn is_staff_only(&self) -> bool {
        matches!(
            self,
            ClientFrame::Watch { .. }
                | ClientFrame::Unwatch { .. }
                | ClientFrame::Takeover { .. }
                | ClientFrame::Release { .. }
                | ClientFrame::Close { .. }
                | ClientFrame::Delete { .. }
                | ClientFrame::Restore { .. }
        )
    }
}

fn yes() -> bool {
    true
}

/// Every `type` a client may send, for the `unknown_type` error.
pub const TYPES: &[&str] = &[
    "send",
    "resume",
    "typing",
    "stop",
    "leave",
    "ping",
    "watch",
    "unwatch",
    "takeover",
    "release",
    "close",
    "delete",
    "restore",
    "request_human",
];

/// Why a text frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Not JSON at all.
    InvalidJson(String),
    /// JSON, but not an object with a string `type`.
    MissingType,
    /// A `type` this server does not know.
    UnknownType(String),
    /// A known type with missing, extra or mistyped fields.
    InvalidFrame(String),
}

impl FrameError {
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::InvalidJson(_) => "invalid_json",
            FrameError::MissingType => "invalid_frame",
            FrameError::UnknownType(_) => "unknown_type",
            FrameError::InvalidFrame(_) => "invalid_frame",
        }
    }

    pub fn message(&self) -> String {
        match self {
            FrameError::InvalidJson(e) => format!("the frame is not valid JSON: {e}"),
            FrameError::MissingType => "a frame is a JSON object with a string `type`".into(),
            FrameError::UnknownType(t) => {
                let t: String = t.chars().take(40).collect();
                format!(
                    "unknown frame type `{t}`; known types: {}",
                    TYPES.join(", ")
                )
            }
            FrameError::InvalidFrame(e) => format!("the frame is not valid: {e}"),
        }
    }
}

/// Reads one text frame.
pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
    // A well-formed frame is read in one pass; anything else is read again, as a JSON value,
    // to tell which error it is.
    if let Ok(frame) = serde_json::from_str(text) {
        return Ok(frame);
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| FrameError::InvalidJson(e.to_string()))?;
    let kind = value
        .get("type")
        .and_then(|t| t.as_str())
        .ok_or(FrameError::MissingType)?;
    if !TYPES.contains(&kind) {
        return Err(FrameError::UnknownType(kind.to_string()));
    }
    serde_json::from_value(value).map_err(|e| FrameError::InvalidFrame(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_given_twice_counts_once_with_its_last_value() {
        assert_eq!(
            parse(r#"{"type":"stop","session_id":"a","session_id":"b"}"#),
            Ok(ClientFrame::Stop {
                session_id: "b".into()
            })
        );
        assert_eq!(
            parse(r#"{"type":"nope","type":"leave","session_id":"s"}"#),
            Ok(ClientFrame::Leave {
                session_id: "s".into()
            })
        );
        assert_eq!(
            parse(r#"{"type":"leave","type":"nope","session_id":"s"}"#),
            Err(FrameError::UnknownType("nope".into()))
        );
    }

    #[test]
    fn reads_each_frame() {
        assert_eq!(
            parse(r#"{"type":"send","session_id":"s","client_id":"c","content":"hi"}"#),
            Ok(ClientFrame::Send {
                session_id: "s".into(),
                client_id: "c".into(),
                content: "hi".into()
            })
        );
        assert_eq!(
            parse(r#"{"type":"resume","session_id":"s","after_seq":3}"#),
            Ok(ClientFrame::Resume {
                session_id: "s".into(),
                after_seq: 3
            })
        );
        assert_eq!(
            parse(r#"{"type":"typing","session_id":"s"}"#),
            Ok(ClientFrame::Typing {
                session_id: "s".into(),
                active: true
            })
        );
        assert!(matches!(
            parse(r#"{"type":"ping"}"#),
            Ok(ClientFrame::Ping { .. })
        ));
        let takeover = parse(r#"{"type":"takeover","session_id":"s"}"#).unwrap();
        assert!(takeover.is_staff_only());
        let ask = parse(r#"{"type":"request_human","session_id":"s"}"#).unwrap();
        assert_eq!(
            ask,
            ClientFrame::RequestHuman {
                session_id: "s".into()
            }
        );
        assert!(!ask.is_staff_only());
    }

    #[test]
    fn says_what_is_wrong() {
        assert_eq!(parse("{nope").unwrap_err().code(), "invalid_json");
        assert_eq!(parse("[1,2]").unwrap_err().code(), "invalid_frame");
        assert_eq!(parse(r#"{"type":7}"#).unwrap_err().code(), "invalid_frame");
        assert_eq!(
            parse(r#"{"type":"dance"}"#).unwrap_err().code(),
            "unknown_type"
        );
        let missing = parse(r#"{"type":"send","session_id":"s"}"#).unwrap_err();
        assert_eq!(missing.code(), "invalid_frame");
        assert!(
            missing.message().contains("client_id"),
            "{}",
            missing.message()
        );
        assert_eq!(
            parse(r#"{"type":"send","session_id":"s","client_id":"c","content":"x","admin":true}"#)
                .unwrap_err()
                .code(),
            "invalid_frame"
        );
    }
}
