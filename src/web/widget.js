// The customer widget: a guest identity kept in localStorage (a reload keeps the
// conversation), one conversation, answers streamed as they are written, and a socket that
// reconnects by itself and resumes after the last message it has.
"use strict";

(() => {
  const { el, api, HttpError, store, Connection, MessageList, clientId } = SB;
  const TYPING_EVERY_MS = 3000;
  const TYPING_IDLE_MS = 4000;
  const PEER_TYPING_SHOWN_MS = 6000;
  const RESEND_AFTER_MS = 2000;
  // Refusals that leave the message unstored but worth sending again (same client_id).
  const RETRYABLE = new Set([
    "rate_limited", "too_many_pending", "shutting_down", "store_failed", "unavailable",
  ]);

  const saved = store("switchboard.widget");
  let auth = saved.load() || {};
  let ready = null; // the conversation this page shows, once known
  // Messages typed but not acknowledged yet, resent with the same client_id after a reconnect
  // (the server stores a client_id once, so a resend cannot duplicate).
  const outbox = new Map();
  let typingSentAt = 0;
  let typingIdle = null;
  let peerTyping = null;
  let humanAsked = false;
  let mode = "ai";

  const $ = (id) => document.getElementById(id);
  const list = new MessageList($("messages"), {
    labels: { user: "You", assistant: "AI consultant", agent: "Support agent", system: "Notice" },
    onChange: updateButtons,
  });

  const connStates = {
    connecting: "Connecting…",
    connected: "Connected",
    reconnecting: "Reconnecting…",
    offline: "Offline: retrying",
  };

  const conn = new Connection({
    path: "/api/v1/chat/ws",
    prepare,
    onState(state) {
      $("conn").dataset.state = state;
      $("conn").textContent = connStates[state] || state;
      // A refusal or a restart notice is old news once the connection is back.
      if (state === "connected" && $("notice").dataset.kind === "error") notice("");
      updateButtons();
    },
    onOpen() {
      list.dropStreaming();
      conn.send({ type: "resume", session_id: ready.sessionId, after_seq: list.lastSeq });
      for (const [id, content] of outbox) {
        conn.send({ type: "send", session_id: ready.sessionId, client_id: id, content });
      }
    },
    onFrame,
    onClose: updateButtons,
  });

  function notice(text, kind) {
    const n = $("notice");
    n.textContent = text || "";
    n.hidden = !text;
    n.dataset.kind = kind || "info";
  }

  function setMode(next) {
    const changed = next !== mode;
    mode = next;
    const badge = $("mode");
    badge.className = "badge mode-" + mode;
    badge.textContent = mode === "human" ? "Support agent" : "AI consultant";
    if (changed && mode === "human") notice("A support agent has joined the conversation.");
    if (changed && mode === "ai") notice("The AI consultant is answering again.");
    if (changed) humanAsked = false;
    updateButtons();
  }

  function saveAuth(signed) {
    auth = {
      access_token: signed.access_token,
      refresh_token: signed.refresh_token,
      user_id: signed.user && signed.user.id,
      session_id: auth.session_id,
    };
    saved.save(auth);
  }

  async function newGuest() {
    saveAuth(await api("/api/v1/auth/guest", { method: "POST" }));
  }

  /** A valid access token: the stored one, a refreshed one, or a new guest. */
  async function validToken() {
    if (!auth.access_token) {
      await newGuest();
      return;
    }
    try {
      await api("/api/v1/users/me", { token: auth.access_token });
      return;
    } catch (e) {
      if (!(e instanceof HttpError) || e.status !== 401) throw e;
    }
    try {
      saveAuth(await api("/api/v1/auth/refresh", {
        method: "POST",
        body: { refresh_token: auth.refresh_token || "" },
      }));
    } catch (e) {
      if (!(e instanceof HttpError)) throw e;
      // The identity is gone for good (expired or revoked): start over as a new guest.
      auth = {};
      await newGuest();
      forgetConversation();
    }
  }

  function forgetConversation() {
    auth.session_id = null;
    saved.save(auth);
    ready = null;
    outbox.clear();
    list.reset();
  }

  async function openConversation() {
    if (auth.session_id) {
      try {
        const s = await api("/api/v1/chat/sessions/" + encodeURIComponent(auth.session_id), {
          token: auth.access_token,
        });
        showSession(s);
        return;
      } catch (e) {
        if (!(e instanceof HttpError) || e.status !== 404) throw e;
        forgetConversation();
      }
    }
    const s = await api("/api/v1/chat/sessions", {
      method: "POST",
      token: auth.access_token,
      body: { title: "Chat from the website" },
    });
    auth.session_id = s.id;
    saved.save(auth);
    showSession(s);
  }

  function showSession(s) {
    if (!ready || ready.sessionId !== s.id) {
      ready = { sessionId: s.id };
    }
    ready.status = s.status;
    setMode(s.mode || "ai");
    if (s.status !== "active") notice("This conversation is closed. Start a new one to write again.");
    updateButtons();
  }

  /** Before every connection attempt: a valid token and the conversation to resume. */
  async function prepare() {
    await validToken();
    await openConversation();
    showDemo();
    return auth.access_token;
  }

  let demoChecked = false;
  /** Says so when the answers come from the built-in demo model. Best effort, once. */
  function showDemo() {
    if (demoChecked) return;
    demoChecked = true;
    api("/api/v1/llm/providers", { token: auth.access_token })
      .then((r) => {
        const primary = (r.providers || []).find((p) => p.role === "primary");
        $("demo").hidden = !(primary && primary.demo);
      })
      .catch(() => {
        demoChecked = false;
      });
  }

  function onFrame(f) {
    if (ready && f.session_id && f.session_id !== ready.sessionId) return;
    switch (f.type) {
      case "message":
        if (f.client_id) outbox.delete(f.client_id);
        list.add(f);
        break;
      case "ack":
        outbox.delete(f.client_id);
        list.ack(f.client_id, f.seq);
        break;
      case "token":
        list.token(f.reply_id, f.delta);
        break;
      case "reply_done":
        list.replyDone(f.reply_id, f.seq, f.interrupted);
        break;
      case "typing":
        if (f.role !== "customer") showPeerTyping(f.active, f.role);
        break;
      case "mode":
        setMode(f.mode);
        break;
      case "human_requested":
        notice("We are finding a support agent for you. You can keep writing meanwhile.");
        humanAsked = true;
        updateButtons();
        break;
      case "human_unavailable":
        notice("No support agent is free right now; the AI consultant goes on helping you.");
        humanAsked = false;
        updateButtons();
        break;
      case "status":
        if (ready) ready.status = f.status;
        if (f.status !== "active") notice("This conversation is closed. Start a new one to write again.");
        else notice("");
        updateButtons();
        break;
      case "error":
        onError(f);
        break;
      default:
        break;
    }
  }

  function onError(f) {
    if (f.client_id && outbox.has(f.client_id) && RETRYABLE.has(f.code)) {
      // Kept in the outbox: sent again shortly, or after the reconnect a restart brings.
      const id = f.client_id;
      setTimeout(() => {
        if (outbox.has(id) && ready) {
          conn.send({ type: "send", session_id: ready.sessionId, client_id: id, content: outbox.get(id) });
        }
      }, RESEND_AFTER_MS);
      if (f.code === "rate_limited") notice("Sending too fast; your message goes out in a moment.");
      return;
    }
    if (f.client_id && outbox.has(f.client_id)) {
      outbox.delete(f.client_id);
      const node = document.querySelector('[data-client-id="' + CSS.escape(f.client_id) + '"]');
      if (node) {
        node.classList.add("failed");
        node.append(el("div", "meta", "Not sent: " + (f.message || f.code)));
      }
    }
    notice(f.message || f.code, "error");
  }

  function showPeerTyping(active, role) {
    const t = $("typing");
    clearTimeout(peerTyping);
    t.hidden = !active;
    const who = role === "agent" || role === "admin" ? "A support agent" : "Someone";
    t.textContent = active ? who + " is typing…" : "";
    if (active) peerTyping = setTimeout(() => (t.hidden = true), PEER_TYPING_SHOWN_MS);
  }

  function updateButtons() {
    const closed = !ready || ready.status !== "active";
    $("send").disabled = closed;
    $("stop").disabled = !conn.ready || !list.hasStreaming();
    $("human").disabled = !conn.ready || closed || humanAsked || mode === "human";
  }

  function sendMessage() {
    const content = $("input").value.trim();
    if (!content || !ready || ready.status !== "active") return;
    const id = clientId();
    outbox.set(id, content);
    list.addPending(id, "user", content);
    conn.send({ type: "send", session_id: ready.sessionId, client_id: id, content });
    $("input").value = "";
    stopTyping();
  }

  function typing() {
    if (!ready) return;
    const now = Date.now();
    if (now - typingSentAt > TYPING_EVERY_MS) {
      typingSentAt = now;
      conn.send({ type: "typing", session_id: ready.sessionId, active: true });
    }
    clearTimeout(typingIdle);
    typingIdle = setTimeout(stopTyping, TYPING_IDLE_MS);
  }

  function stopTyping() {
    clearTimeout(typingIdle);
    if (typingSentAt && ready) {
      conn.send({ type: "typing", session_id: ready.sessionId, active: false });
    }
    typingSentAt = 0;
  }

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    sendMessage();
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      sendMessage();
    }
  });
  $("input").addEventListener("input", typing);
  $("stop").addEventListener("click", () => {
    if (ready) conn.send({ type: "stop", session_id: ready.sessionId });
  });
  $("human").addEventListener("click", () => {
    if (ready && conn.send({ type: "request_human", session_id: ready.sessionId })) {
      humanAsked = true;
      updateButtons();
      notice("Asking for a support agent…");
    }
  });
  $("restart").addEventListener("click", () => {
    conn.stop();
    forgetConversation();
    notice("");
    conn.start();
  });

  conn.start();
})();
