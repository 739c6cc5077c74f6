//! AWS Bedrock through the official SDK: ConverseStream for streamed answers, Converse for
//! whole ones.
//!
//! Region, credentials and endpoint come from the standard AWS chain (`AWS_REGION`,
//! `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, `AWS_ENDPOINT_URL_BEDROCK_RUNTIME`,
//! instance roles …); the settings may name a region, an endpoint and static keys explicitly.
//! The SDK's own retries are off: the resilience layer around every provider retries, so one
//! policy (and one set of metrics) covers all providers.

use anyhow::bail;
use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_bedrockruntime::config::http::HttpResponse;
use aws_sdk_bedrockruntime::config::Credentials;
use aws_sdk_bedrockruntime::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_bedrockruntime::operation::converse::ConverseError;
use aws_sdk_bedrockruntime::operation::converse_stream::ConverseStreamError;
use aws_sdk_bedrockruntime::types::error::ConverseStreamOutputError;
use aws_sdk_bedrockruntime::types::{
    ContentBlock, ContentBlockDelta, ConversationRole, ConverseStreamOutput, Message,
    SystemContentBlock, TokenUsage,
};
use aws_sdk_bedrockruntime::Client;
use futures_util::future::BoxFuture;
use futures_util::stream;

use super::{
    model_role, Answer, ChatRequest, Chunk, Prompt, Provider, ProviderError, TokenStream, Usage,
};
use crate::config::AiSettings;

pub struct BedrockProvider {
    client: Client,
    model: String,
    prompt: Prompt,
}

impl BedrockProvider {
    pub async fn new(ai: &AiSettings) -> anyhow::Result<BedrockProvider> {
        if ai.model.trim().is_empty() {
            bail!(
                "AI_PROVIDER=bedrock needs AI_MODEL (a Bedrock model id such as \
                 `anthropic.claude-3-5-haiku-20241022-v1:0`)"
            );
        }
        let mut loader =
            aws_config::defaults(BehaviorVersion::latest()).retry_config(RetryConfig::disabled());
        if !ai.aws_region.trim().is_empty() {
            loader = loader.region(Region::new(ai.aws_region.trim().to_string()));
        }
        if !ai.bedrock_endpoint_url.trim().is_empty() {
            loader = loader.endpoint_url(ai.bedrock_endpoint_url.trim());
        }
        let key_id = ai.bedrock_access_key_id.expose().trim();
        let secret = ai.bedrock_secret_access_key.expose().trim();
        if !key_id.is_empty() || !secret.is_empty() {
            if key_id.is_empty() || secret.is_empty() {
                bail!("ai.bedrock_access_key_id and ai.bedrock_secret_access_key go together");
            }
            loader = loader.credentials_provider(Credentials::new(
                key_id,
                secret,
                None,
                None,
                "switchboard-settings",
            ));
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            bail!("AI_PROVIDER=bedrock needs a region: set AWS_REGION (e.g. us-east-1)");
        }
        let client = Client::new(&sdk);
        Ok(BedrockProvider {
            client,
            model: ai.model.trim().to_string(),
            prompt: Prompt::from_settings(ai),
        })
    }

    fn system(&self) -> Option<Vec<SystemContentBlock>> {
        (!self.prompt.system.is_empty())
            .then(|| vec![SystemContentBlock::Text(self.prompt.system.clone())])
    }

    /// Converse wants turns that start with the user and alternate: turns of one side in a
    /// row are joined, and anything before the first customer turn is left out.
    fn messages(&self, request: &ChatRequest) -> Result<Vec<Message>, ProviderError> {
        let mut merged: Vec<(ConversationRole, String)> = Vec::new();
        for turn in self.prompt.trim(&request.history) {
            let role = match model_role(&turn.role) {
                "user" => ConversationRole::User,
                "assistant" => ConversationRole::Assistant,
                _ => continue, // system turns travel in `system`
            };
            match merged.last_mut() {
                Some((last, text)) if *last == role => {
                    text.push_str("\n\n");
                    text.push_str(&turn.content);
                }
                None if role == ConversationRole::Assistant => {}
                _ => merged.push((role, turn.content)),
            }
        }
        if merged.is_empty() {
            return Err(ProviderError::Rejected {
                status: 400,
                message: "the conversation has no customer message to answer".into(),
            });
        }
        merged
            .into_iter()
            .map(|(role, text)| {
                Message::builder()
                    .role(role)
                    .content(ContentBlock::Text(text))
                    .build()
                    .map_err(|e| ProviderError::Failed(format!("building the request: {e}")))
            })
            .collect()
    }
}

impl Provider for BedrockProvider {
    fn name(&self) -> &str {
        "bedrock"
    }

    fn model(&self) -> &str {
        &self.model
    }

    fn stream(&self, request: ChatRequest) -> TokenStream {
        let messages = match self.messages(&request) {
            Ok(m) => m,
            Err(e) => return Box::pin(stream::once(async move { Err(e) })),
        };
        let call = self
            .client
            .converse_stream()
            .model_id(request.model.as_deref().unwrap_or(&self.model))
            .set_messages(Some(messages))
            .set_system(self.system());
        let started = async move {
            let out = call.send().await.map_err(call_error)?;
            Ok::<_, ProviderError>(out.stream)
        };
        // State: the call not yet made, or the receiver it gave; `Done` once finished.
        enum State<F, R> {
            Start(F),
            Reading(R, bool),
            Done,
        }
        Box::pin(stream::unfold(
            State::Start(Box::pin(started)),
            |state| async move {
                let (mut rx, mut stopped) = match state {
                    State::Start(call) => match call.await {
                        Ok(rx) => (rx, false),
                        Err(e) => return Some((Err(e), State::Done)),
                    },
                    State::Reading(rx, stopped) => (rx, stopped),
                    State::Done => return None,
                };
                loop {
                    match rx.recv().await {
                        Ok(Some(ConverseStreamOutput::ContentBlockDelta(ev))) => {
                            if let Some(ContentBlockDelta::Text(text)) = ev.delta {
                                if !text.is_empty() {
                                    return Some((
                                        Ok(Chunk::Text(text)),
                                        State::Reading(rx, stopped),
                                    ));
                                }
                            }
                        }
                        Ok(Some(ConverseStreamOutput::MessageStop(_))) => stopped = true,
                        Ok(Some(ConverseStreamOutput::Metadata(meta))) => {
                            if let Some(usage) = meta.usage {
                                return Some((
                                    Ok(Chunk::Usage(usage_of(&usage))),
                                    State::Reading(rx, stopped),
                                ));
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) if stopped => return None,
                        Ok(None) => {
                            let e =
                                ProviderError::Failed("the stream ended before messageStop".into());
                            return Some((Err(e), State::Done));
                        }
                        Err(e) => return Some((Err(sdk_error(e, None)), State::Done)),
                    }
                }
            },
        ))
    }

    fn complete(&self, request: ChatRequest) -> BoxFuture<'static, Result<Answer, ProviderError>> {
        let messages = match self.messages(&request) {
            Ok(m) => m,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let call = self
            .client
            .converse()
            .model_id(request.model.as_deref().unwrap_or(&self.model))
            .set_messages(Some(messages))
            .set_system(self.system());
        Box::pin(async move {
            let out = call.send().await.map_err(call_error)?;
            let text: String = out
                .output
                .as_ref()
                .and_then(|o| o.as_message().ok())
                .map(|m| {
                    m.content
                        .iter()
                        .filter_map(|b| b.as_text().ok())
                        .map(String::as_str)
                        .collect()
                })
                .ok_or_else(|| ProviderError::Failed("the answer holds no message".into()))?;
            Ok(Answer {
                text,
                usage: out.usage.as_ref().map(usage_of),
            })
        })
    }
}

fn usage_of(u: &TokenUsage) -> Usage {
    Usage {
        input_tokens: u.input_tokens.max(0) as u64,
        output_tokens: u.output_tokens.max(0) as u64,
    }
}

/// The Bedrock error an SDK error value is, by its type: an exception inside the event
/// stream carries no error code in its metadata, only its type.
trait Named {
    fn name(&self) -> Option<&'static str>;
}

impl Named for ConverseStreamOutputError {
    fn name(&self) -> Option<&'static str> {
        Some(match self {
            Self::ThrottlingException(_) => "ThrottlingException",
            Self::InternalServerException(_) => "InternalServerException",
            Self::ServiceUnavailableException(_) => "ServiceUnavailableException",
            Self::ModelStreamErrorException(_) => "ModelStreamErrorException",
            Self::ValidationException(_) => "ValidationException",
            _ => return None,
        })
    }
}

impl Named for ConverseStreamError {
    fn name(&self) -> Option<&'static str> {
        Some(match self {
            Self::ThrottlingException(_) => "ThrottlingException",
            Self::InternalServerException(_) => "InternalServerException",
            Self::ServiceUnavailableException(_) => "ServiceUnavailableException",
            Self::ModelStreamErrorException(_) => "ModelStreamErrorException",
            Self::ModelNotReadyException(_) => "ModelNotReadyException",
            Self::ModelTimeoutException(_) => "ModelTimeoutException",
            _ => return None,
        })
    }
}

impl Named for ConverseError {
    fn name(&self) -> Option<&'static str> {
        Some(match self {
            Self::ThrottlingException(_) => "ThrottlingException",
            Self::InternalServerException(_) => "InternalServerException",
            Self::ServiceUnavailableException(_) => "ServiceUnavailableException",
            Self::ModelNotReadyException(_) => "ModelNotReadyException",
            Self::ModelTimeoutException(_) => "ModelTimeoutException",
            _ => return None,
        })
    }
}

/// A failed call, where the HTTP response (if one came) gives the status.
fn call_error<E>(e: SdkError<E, HttpResponse>) -> ProviderError
where
    E: Named + ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = e.raw_response().map(|r| r.status().as_u16());
    sdk_error(e, status)
}

/// What an SDK failure means for retrying. Bedrock names its errors; the HTTP status (absent
/// for errors inside the event stream) decides the rest.
fn sdk_error<E, R>(e: SdkError<E, R>, status: Option<u16>) -> ProviderError
where
    E: Named + ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match &e {
        SdkError::TimeoutError(_) => ProviderError::Timeout(format!("{e}")),
        SdkError::DispatchFailure(d) if d.is_timeout() => {
            ProviderError::Timeout(format!("{:?}", d))
        }
        SdkError::DispatchFailure(d) if d.is_io() => ProviderError::Connect(format!("{:?}", d)),
        SdkError::ServiceError(service) => {
            let err = service.err();
            let code = err.name().or(err.code()).unwrap_or("Unknown");
            let message = format!("{code}: {}", err.message().unwrap_or("no message"));
            match code {
                "ThrottlingException" => ProviderError::Throttled(message),
                "ModelTimeoutException" => ProviderError::Timeout(message),
                "InternalServerException"
                | "ServiceUnavailableException"
                | "ModelStreamErrorException"
                | "ModelNotReadyException" => ProviderError::Server {
                    status: status.filter(|s| *s >= 500).unwrap_or(503),
                    message,
                },
                _ => ProviderError::from_status(status.unwrap_or(400), message),
            }
        }
        _ => ProviderError::Failed(
            aws_sdk_bedrockruntime::error::DisplayErrorContext(&e)
                .to_string()
                .chars()
                .take(500)
                .collect(),
        ),
    }
}
