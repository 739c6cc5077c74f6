// Shared by the customer widget and the agent dashboard: the HTTP and WebSocket clients, and
// the list that renders a conversation. Every piece of user text reaches the page through
// textContent, never as HTML.
"use strict";

const SB = (() => {
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 5000;
  // No frame for this long means the link is dead even if the socket has not noticed.
  const SILENCE_LIMIT_MS = 25000;
  const PING_EVERY_MS = 10000;
  // After this many failed attempts in a row the state shows "offline" instead of "reconnecting".
  const OFFLINE_AFTER_FAILURES = 4;

  /** An element with a class and text; text always goes in as text. */
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  class HttpError extends Error {
    constructor(status, code, message) {
      super(message || code || "HTTP " + status);
      this.status = status;
      this.code = code;
    }
  }

  /** JSON over HTTP; throws HttpError with the server's error code, or TypeError when offline. */
  async function api(path, { method = "GET", token, body } = {}) {
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
    let data = null;
    try {
      data = await res.json();
    } catch (_) {
      data = null;
    }
    if (!res.ok) {
      throw new HttpError(res.status, data && data.error, data && data.message);
    }
    return data;
  }

  /** Reads and writes one JSON object in localStorage; a broken entry counts as none. */
  function store(key) {
    return {
      load() {
        try {
          return JSON.parse(localStorage.getItem(key) || "null");
        } catch (_) {
          return null;
        }
      },
      save(value) {
        localStorage.setItem(key, JSON.stringify(value));
      },
      clear() {
        localStorage.removeItem(key);
      },
    };
  }

  /**
   * One WebSocket that keeps itself connected: backoff with jitter between attempts, an
   * application ping so a dead link is noticed, and `prepare()` before every attempt (the
   * page checks or renews its token there; a browser cannot read why a handshake failed).
   *
   * Callbacks: onState("connecting"|"connected"|"reconnecting"|"offline"), onOpen(hello),
   * onFrame(frame), onClose().
   */
  class Connection {
    constructor({ path, prepare, onState, onOpen, onFrame, onClose }) {
      this.path = path;
      this.prepare = prepare;
      this.onState = onState || (() => {});
      this.onOpen = onOpen || (() => {});
      this.onFrame = onFrame || (() => {});
      this.onClose = onClose || (() => {});
      this.ws = null;
      this.failures = 0;
      this.timer = null;
      this.pinger = null;
      this.lastFrameAt = 0;
      this.stopped = false;
      this.ready = false;
      this.nonce = 0;
      window.addEventListener("online", () => this.retryNow());
      window.addEventListener("offline", () => {
        this.state("offline");
        if (this.ws) this.ws.close();
      });
    }

    start() {
      this.stopped = false;
      this.attempt();
    }

    stop() {
      this.stopped = true;
      clearTimeout(this.timer);
      clearInterval(this.pinger);
      if (this.ws) this.ws.close(1000, "bye");
      this.ws = null;
      this.ready = false;
    }

    state(name) {
      this.currentState = name;
      this.onState(name);
    }

    retryNow() {
      if (this.stopped || this.ws) return;
      clearTimeout(this.timer);
      this.attempt();
    }

    async attempt() {
      if (this.stopped) return;
      this.state(this.failures === 0 ? "connecting" : this.lostState());
      let token;
      try {
        token = await this.prepare();
      } catch (e) {
        this.scheduleRetry();
        return;
      }
      if (this.stopped || !token) return;
      const url = new URL(this.path, window.location.href);
      url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
      let ws;
      try {
        // The token travels as a sub-protocol: browsers cannot set headers on a WebSocket,
        // and a query string ends up in access logs.
        ws = new WebSocket(url.toString(), ["switchboard.v1", "bearer." + token]);
      } catch (e) {
        this.scheduleRetry();
        return;
      }
      this.ws = ws;
      ws.onmessage = (event) => {
        this.lastFrameAt = Date.now();
        let frame;
        try {
          frame = JSON.parse(event.data);
        } catch (_) {
          return;
        }
        if (frame.type === "hello") {
          this.failures = 0;
          this.ready = true;
          this.state("connected");
          this.onOpen(frame);
          return;
        }
        if (frame.type === "pong") return;
        this.onFrame(frame);
      };
      ws.onclose = () => {
        if (this.ws !== ws) return;
        this.ws = null;
        this.ready = false;
        clearInterval(this.pinger);
        this.onClose();
        this.scheduleRetry();
      };
      ws.onopen = () => {
        this.lastFrameAt = Date.now();
        clearInterval(this.pinger);
        this.pinger = setInterval(() => this.keepAlive(ws), PING_EVERY_MS);
      };
    }

    keepAlive(ws) {
      if (this.ws !== ws) return;
      if (Date.now() - this.lastFrameAt > SILENCE_LIMIT_MS) {
        ws.close(4000, "no frames");
        return;
      }
      this.send({ type: "ping", nonce: ++this.nonce });
    }

    lostState() {
      return !navigator.onLine || this.failures >= OFFLINE_AFTER_FAILURES ? "offline" : "reconnecting";
    }

    scheduleRetry() {
      if (this.stopped) return;
      this.failures += 1;
      this.state(this.lostState());
      const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** (this.failures - 1));
      const delay = base / 2 + Math.random() * (base / 2);
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.attempt(), delay);
    }

    /** Sends a frame if the socket is up; returns whether it went out. */
    send(frame) {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
      this.ws.send(JSON.stringify(frame));
      return true;
    }
  }

  const ROLE_LABELS = { user: "You", assistant: "AI consultant", agent: "Agent", system: "System" };

  /**
   * A conversation on the page: stored messages in seq order, each shown once; the customer's
   * own messages while they wait for their ack; AI answers while they are written. Only the
   * last `cap` stored messages stay in the page, so a long conversation stays smooth.
   */
  class MessageList {
    constructor(container, { cap = 500, labels = ROLE_LABELS, onChange } = {}) {
      this.container = container;
      this.cap = cap;
      this.labels = labels;
      this.onChange = onChange || (() => {});
      this.reset();
    }

    reset() {
      this.container.replaceChildren();
      this.bySeq = new Map();
      this.pending = new Map();
      this.streaming = new Map();
      this.maxSeq = 0;
      this.trimmedBelow = 0;
      this.trimNote = null;
    }

    get lastSeq() {
      return this.maxSeq;
    }

    hasStreaming() {
      return this.streaming.size > 0;
    }

    render(role, text, extraClass) {
      const node = el("div", "msg role-" + role + (extraClass ? " " + extraClass : ""));
      node.dataset.role = role;
      node.append(el("div", "who", this.labels[role] || role), el("div", "body", text));
      return node;
    }

    stick(fn) {
      const c = this.container;
      const atBottom = c.scrollHeight - c.scrollTop - c.clientHeight < 80;
      fn();
      if (atBottom) c.scrollTop = c.scrollHeight;
      this.onChange();
    }

    /** A stored message (live or replayed). Returns false when it was already shown. */
    add(m) {
      if (typeof m.seq !== "number" || this.bySeq.has(m.seq) || m.seq <= this.trimmedBelow) {
        return false;
      }
      this.stick(() => {
        let node = m.client_id ? this.pending.get(m.client_id) : null;
        if (node) {
          this.pending.delete(m.client_id);
          node.remove();
        }
        node = this.render(m.role, m.content, m.interrupted ? "interrupted" : "");
        this.finish(node, m);
        this.insert(node, m.seq);
        this.trim();
      });
      return true;
    }

    finish(node, m) {
      node.dataset.seq = String(m.seq);
      if (m.created_at) node.title = new Date(m.created_at).toLocaleString();
      if (m.interrupted) node.append(el("div", "meta", "(interrupted)"));
      this.bySeq.set(m.seq, node);
      this.maxSeq = Math.max(this.maxSeq, m.seq);
    }

    /** Stored messages stay in seq order ahead of the pending and streaming ones. */
    insert(node, seq) {
      let after = this.container.lastElementChild;
      while (after && (after.dataset.seq === undefined || Number(after.dataset.seq) > seq)) {
        after = after.previousElementSibling;
      }
      if (after) after.after(node);
      else this.container.prepend(node);
      if (this.trimNote) this.container.prepend(this.trimNote);
    }

    trim() {
      while (this.bySeq.size > this.cap) {
        const oldest = Math.min(...this.bySeq.keys());
        this.bySeq.get(oldest).remove();
        this.bySeq.delete(oldest);
        this.trimmedBelow = Math.max(this.trimmedBelow, oldest);
      }
      if (this.trimmedBelow > 0 && !this.trimNote) {
        this.trimNote = el("div", "trimmed", "Older messages are not shown.");
        this.container.prepend(this.trimNote);
      }
    }

    /** The customer's own message, shown at once and marked as sending until its ack. */
    addPending(clientId, role, content) {
      this.stick(() => {
        const node = this.render(role, content, "pending");
        node.dataset.clientId = clientId;
        this.pending.set(clientId, node);
        this.container.append(node);
      });
    }

    ack(clientId, seq) {
      const node = this.pending.get(clientId);
      if (!node) return;
      this.pending.delete(clientId);
      if (this.bySeq.has(seq) || seq <= this.trimmedBelow) {
        node.remove();
        return;
      }
      node.classList.remove("pending");
      node.remove();
      this.finish(node, { seq });
      this.stick(() => {
        this.insert(node, seq);
        this.trim();
      });
    }

    /** A piece of an AI answer being written. */
    token(replyId, delta) {
      this.stick(() => {
        let node = this.streaming.get(replyId);
        if (!node) {
          node = this.render("assistant", "", "streaming");
          node.dataset.replyId = replyId;
          this.streaming.set(replyId, node);
          this.container.append(node);
        }
        node.querySelector(".body").textContent += delta;
      });
    }

    /** The answer is stored: what was streamed becomes the message with that seq. */
    replyDone(replyId, seq, interrupted) {
      const node = this.streaming.get(replyId);
      this.streaming.delete(replyId);
      if (!node) return;
      node.remove();
      const content = node.querySelector(".body").textContent;
      this.add({ seq, role: "assistant", content, interrupted });
      this.onChange();
    }

    /** Answers in progress are dropped on reconnect: a resume restates them from the start. */
    dropStreaming() {
      for (const node of this.streaming.values()) node.remove();
      this.streaming.clear();
      this.onChange();
    }
  }

  /** "5s", "3m 10s", "2h 5m". */
  function duration(ms) {
    const s = Math.max(0, Math.floor(ms / 1000));
    if (s < 60) return s + "s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + "m " + (s % 60) + "s";
    const h = Math.floor(m / 60);
    if (h < 24) return h + "h " + (m % 60) + "m";
    return Math.floor(h / 24) + "d " + (h % 24) + "h";
  }

  function clientId() {
    const rand = Math.random().toString(36).slice(2, 10);
    return "w-" + Date.now().toString(36) + "-" + rand;
  }

  return { el, api, HttpError, store, Connection, MessageList, duration, clientId, ROLE_LABELS };
})();
