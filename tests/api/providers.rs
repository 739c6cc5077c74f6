//! Real providers against fake far ends on 127.0.0.1: the OpenAI-compatible client over SSE,
//! and the AWS SDK against a fake Bedrock speaking JSON and AWS event-stream frames. What the
//! customer sees on the socket is checked against what was stored and what the far end got.

use serde_json::{json, Value};
use switchboard::config::Settings;

use crate::fake_http::{
    bedrock_converse, bedrock_error, bedrock_stream, bedrock_stream_reply, openai_sse, FakeServer,
    Part, Reply,
};
use crate::helpers::{customer_with_session, spawn_app_with, stored_messages, tokens_text};
use crate::ws::WsClient;

/// Points the app at an OpenAI-compatible fake.
pub fn use_openai(s: &mut Settings, fake: &FakeServer) {
    s.ai.provider = "openai".into();
    s.ai.model = "test-model".into();
    s.ai.openai_base_url = format!("{}/v1", fake.url);
}

/// Sends one customer message over a socket and reads until the answer ends
/// (`reply_done`, or an `error` with no answer to store).
pub async fn ask(ws: &mut WsClient, session_id: &str, client_id: &str, text: &str) -> Vec<Value> {
    ws.send_message(session_id, client_id, text).await;
    ws.until(|f| f["type"] == "reply_done").await
}

#[tokio::test]
async fn an_openai_compatible_answer_streams_over_the_socket_and_is_stored() {
    let fake = FakeServer::start(vec![Reply::stream(
        "text/event-stream",
        openai_sse(&["Hello", " there,", " friend."], Some((42, 3))),
    )])
    .await;
    let fake_for_app = fake.clone();
    let app = spawn_app_with(move |s| {
        use_openai(s, &fake_for_app);
        s.ai.openai_api_key = switchboard::config::Secret::new("sk-test-key");
        s.ai.system_prompt = "Be brief.".into();
    })
    .await;
    let (token, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;

    let frames = ask(&mut ws, &sid, "c-1", "What are your opening hours?").await;
    assert_eq!(tokens_text(&frames), "Hello there, friend.");
    let done = frames.last().unwrap();
    assert_eq!(done["interrupted"], false, "{done}");
    assert!(frames.iter().all(|f| f["type"] != "error"), "{frames:?}");

    let messages = stored_messages(&app, &token, &sid).await;
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["content"], "Hello there, friend.");
    assert_eq!(messages[1]["model"], "test-model");
    assert_eq!(messages[1]["tokens"], 3);

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let req = &requests[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/v1/chat/completions");
    assert_eq!(req.header("authorization"), Some("Bearer sk-test-key"));
    let body = req.json();
    assert_eq!(body["model"], "test-model");
    assert_eq!(body["stream"], true);
    assert_eq!(
        body["messages"],
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What are your opening hours?"}
        ])
    );
}

#[tokio::test]
async fn the_conversation_so_far_is_sent_trimmed_to_the_budget() {
    let fake = FakeServer::start(vec![Reply::stream(
        "text/event-stream",
        openai_sse(&["ok"], None),
    )])
    .await;
    let fake_for_app = fake.clone();
    let app = spawn_app_with(move |s| {
        use_openai(s, &fake_for_app);
        s.ai.history_chars = 30;
    })
    .await;
    let (token, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;
    ask(&mut ws, &sid, "c-1", "first question, long enough to drop").await;
    ask(&mut ws, &sid, "c-2", "second question").await;

    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    let messages = requests[1].json()["messages"].clone();
    let messages = messages.as_array().unwrap();
    // The system prompt, then only what fits in 30 characters: "ok" and the new question.
    assert_eq!(messages[0]["role"], "system");
    assert_eq!(
        messages[1..].to_vec(),
        vec![
            json!({"role": "assistant", "content": "ok"}),
            json!({"role": "user", "content": "second question"}),
        ]
    );
}

#[tokio::test]
async fn a_stream_cut_mid_answer_ends_as_interrupted_with_an_error() {
    let mut parts = vec![
        crate::fake_http::openai_delta("Partial"),
        crate::fake_http::openai_delta(" answer"),
    ];
    parts.push(Part::Cut);
    let fake = FakeServer::start(vec![Reply::stream("text/event-stream", parts)]).await;
    let fake_for_app = fake.clone();
    let app = spawn_app_with(move |s| use_openai(s, &fake_for_app)).await;
    let (token, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;

    let frames = ask(&mut ws, &sid, "c-1", "hello").await;
    let error = frames
        .iter()
        .find(|f| f["type"] == "error")
        .unwrap_or_else(|| panic!("no error frame in {frames:?}"));
    assert_eq!(error["session_id"], sid.as_str(), "{error}");
    let done = frames.last().unwrap();
    assert_eq!(done["interrupted"], true, "{done}");
    let messages = stored_messages(&app, &token, &sid).await;
    assert_eq!(messages[1]["content"], "Partial answer");
    assert_eq!(messages[1]["interrupted"], true);
}

pub const BEDROCK_MODEL: &str = "anthropic.claude-3-haiku-20240307-v1:0";

/// Points the app at a fake Bedrock, with static test keys (never real ones).
pub fn use_bedrock(s: &mut Settings, fake: &FakeServer) {
    s.ai.provider = "bedrock".into();
    s.ai.model = BEDROCK_MODEL.into();
    s.ai.aws_region = "us-east-1".into();
    s.ai.bedrock_endpoint_url = fake.url.clone();
    s.ai.bedrock_access_key_id = switchboard::config::Secret::new("AKIDTESTONLY");
    s.ai.bedrock_secret_access_key = switchboard::config::Secret::new("test-secret-not-real");
}

#[tokio::test]
async fn a_bedrock_answer_streams_from_converse_stream_and_is_stored() {
    let fake = FakeServer::start(vec![bedrock_stream_reply(bedrock_stream(
        &["Our hours", " are 9 to 5", "."],
        (21, 6),
    ))])
    .await;
    let fake_for_app = fake.clone();
    let app = spawn_app_with(move |s| {
        use_bedrock(s, &fake_for_app);
        s.ai.system_prompt = "Be brief.".into();
    })
    .await;
    let (token, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;

    let frames = ask(&mut ws, &sid, "c-1", "When are you open?").await;
    assert_eq!(tokens_text(&frames), "Our hours are 9 to 5.");
    assert!(frames.iter().all(|f| f["type"] != "error"), "{frames:?}");
    assert_eq!(frames.last().unwrap()["interrupted"], false);

    let messages = stored_messages(&app, &token, &sid).await;
    assert_eq!(messages[1]["content"], "Our hours are 9 to 5.");
    assert_eq!(messages[1]["model"], BEDROCK_MODEL);
    assert_eq!(messages[1]["tokens"], 6);

    let requests = fake.requests();
    assert_eq!(requests.len(), 1, "the SDK retried on its own");
    let req = &requests[0];
    assert_eq!(req.method, "POST");
    // The model id's `:` arrives percent-encoded.
    assert_eq!(
        req.path,
        "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse-stream"
    );
    assert!(
        req.header("authorization")
            .is_some_and(|a| a.starts_with("AWS4-HMAC-SHA256 Credential=AKIDTESTONLY/")),
        "{:?}",
        req.header("authorization")
    );
    let body = req.json();
    assert_eq!(body["system"], json!([{"text": "Be brief."}]));
    assert_eq!(
        body["messages"],
        json!([{"role": "user", "content": [{"text": "When are you open?"}]}])
    );
}

#[tokio::test]
async fn bedrock_gets_alternating_turns_starting_with_the_customer() {
    let fake = FakeServer::start(vec![bedrock_stream_reply(bedrock_stream(
        &["fine"],
        (1, 1),
    ))])
    .await;
    let fake_for_app = fake.clone();
    let app = spawn_app_with(move |s| use_bedrock(s, &fake_for_app)).await;
    let (token, sid) = customer_with_session(&app).await;
    let mut ws = WsClient::customer(&app, &token).await;
    ask(&mut ws, &sid, "c-1", "one").await;
    // Two customer messages in a row (the second after the answer) and an answer between.
    ask(&mut ws, &sid, "c-2", "two").await;
    let body = fake.requests()[1].json();
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": [{"text": "one"}]},
            {"role": "assistant", "content": [{"text": "fine"}]},
            {"role": "user", "content": [{"text": "two"}]},
        ])
    );
}

#[tokio::test]
async fn bedrock_and_openai_give_whole_answers_through_converse_and_completions() {
    use switchboard::providers::{self, ChatRequest, Turn};
    let request = ChatRequest {
        session_id: "s".into(),
        history: vec![Turn {
            role: "user".into(),
            content: "hi".into(),
        }],
        model: None,
    };

    let bedrock =
        FakeServer::start(vec![Reply::json(200, &bedrock_converse("Whole answer."))]).await;
    let mut settings = crate::helpers::test_settings("sqlite://unused");
    use_bedrock(&mut settings, &bedrock);
    let provider = providers::build("bedrock", &settings.ai).await.unwrap();
    let answer = provider.complete(request.clone()).await.unwrap();
    assert_eq!(answer.text, "Whole answer.");
    assert_eq!(answer.usage.unwrap().output_tokens, 4);
    assert_eq!(
        bedrock.requests()[0].path,
        "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
    );

    let openai = FakeServer::start(vec![Reply::json(
        200,
        &crate::fake_http::openai_completion("Also whole."),
    )])
    .await;
    use_openai(&mut settings, &openai);
    let provider = providers::build("openai", &settings.ai).await.unwrap();
    let answer = provider.complete(request).await.unwrap();
    assert_eq!(answer.text, "Also whole.");
    assert_eq!(answer.usage.unwrap().output_tokens, 3);
    assert_eq!(openai.requests()[0].json()["stream"], false);
}

#[tokio::test]
async fn provider_errors_keep_their_kind() {
    use switchboard::providers::{self, ChatRequest, ProviderError, Turn};
    let request = ChatRequest {
        session_id: "s".into(),
        history: vec![Turn {
            role: "user".into(),
            content: "hi".into(),
        }],
        model: None,
    };
    let fake = FakeServer::start(vec![
        bedrock_error(429, "ThrottlingException", "Too many requests"),
        bedrock_error(400, "ValidationException", "bad model"),
        bedrock_error(500, "InternalServerException", "oops"),
    ])
    .await;
    let mut settings = crate::helpers::test_settings("sqlite://unused");
    use_bedrock(&mut settings, &fake);
    let provider = providers::build("bedrock", &settings.ai).await.unwrap();
    let e = provider.complete(request.clone()).await.unwrap_err();
    assert!(matches!(e, ProviderError::Throttled(_)), "{e:?}");
    let e = provider.complete(request.clone()).await.unwrap_err();
    assert!(
        matches!(e, ProviderError::Rejected { status: 400, .. }),
        "{e:?}"
    );
    let e = provider.complete(request.clone()).await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    assert_eq!(fake.request_count(), 3, "the SDK retried on its own");

    let fake = FakeServer::start(vec![
        Reply::json(429, &json!({"error": {"message": "slow down"}})),
        Reply::json(401, &json!({"error": {"message": "bad key"}})),
        Reply::json(503, &json!({"error": {"message": "overloaded"}})),
    ])
    .await;
    use_openai(&mut settings, &fake);
    let provider = providers::build("openai", &settings.ai).await.unwrap();
    let e = provider.complete(request.clone()).await.unwrap_err();
    assert_eq!(e, ProviderError::Throttled("slow down".into()));
    let e = provider.complete(request.clone()).await.unwrap_err();
    assert!(
        matches!(e, ProviderError::Rejected { status: 401, .. }),
        "{e:?}"
    );
    let e = provider.complete(request).await.unwrap_err();
    assert!(
        matches!(e, ProviderError::Server { status: 503, .. }),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_provider_without_what_it_needs_says_what_to_set() {
    use switchboard::providers;
    let mut settings = crate::helpers::test_settings("sqlite://unused");
    settings.ai.model = String::new();
    for name in ["openai", "bedrock"] {
        let err = providers::build(name, &settings.ai)
            .await
            .err()
            .expect("refused");
        assert!(format!("{err:#}").contains("AI_MODEL"), "{err:#}");
    }
    settings.ai.model = "m".into();
    settings.ai.openai_base_url = "127.0.0.1:11434/v1".into();
    let err = providers::build("openai", &settings.ai)
        .await
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("OPENAI_BASE_URL"), "{err:#}");
    settings.ai.bedrock_access_key_id = switchboard::config::Secret::new("AKIDONLY");
    settings.ai.aws_region = "us-east-1".into();
    let err = providers::build("bedrock", &settings.ai)
        .await
        .err()
        .expect("refused");
    assert!(
        format!("{err:#}").contains("bedrock_secret_access_key"),
        "{err:#}"
    );
}
