// The agent desk: every live conversation with its mode and waiting time, the human queue,
// one conversation followed live (`watch`), takeover / hand back / close, and search.
// Everything comes over the staff socket; after a reconnect the snapshot and a new `watch`
// bring the page up to date, and messages already shown are recognised by their seq.
"use strict";

(() => {
  const { el, api, HttpError, store, Connection, MessageList, duration, clientId } = SB;
  let listMax = 200; // how many live conversations are listed; the snapshot says
  const TOAST_MS = 8000;
  const PEER_TYPING_SHOWN_MS = 6000;

  const $ = (id) => document.getElementById(id);
  const saved = store("switchboard.desk");
  let auth = saved.load() || {};
  const sessions = new Map();
  let queue = [];
  let current = null; // id of the conversation being watched
  let toastTimer = null;
  let peerTyping = null;
  let searchQuery = "";
  let searchCursor = null;

  const list = new MessageList($("messages"), {
    labels: { user: "Customer", assistant: "AI consultant", agent: "Agent", system: "System" },
  });

  const connStates = {
    connecting: "Connecting…",
    connected: "Live",
    reconnecting: "Reconnecting…",
    offline: "Offline: retrying",
  };

  const conn = new Connection({
    path: "/api/v1/admin/chat/ws",
    prepare,
    onState(state) {
      $("conn").dataset.state = state;
      $("conn").textContent = connStates[state] || state;
    },
    onOpen() {
      if (current) {
        list.dropStreaming();
        conn.send({ type: "watch", session_id: current });
      }
    },
    onFrame,
  });

  function toast(text) {
    const t = $("toast");
    t.textContent = text;
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => (t.hidden = true), TOAST_MS);
  }

  // ---- signing in ----------------------------------------------------------------------

  function showLogin(message) {
    conn.stop();
    $("desk").hidden = true;
    $("login").hidden = false;
    const err = $("login-error");
    err.textContent = message || "";
    err.hidden = !message;
    $("email").focus();
  }

  function showDesk() {
    $("login").hidden = true;
    $("desk").hidden = false;
    $("me").textContent = auth.user ? auth.user.email + " (" + auth.user.role + ")" : "";
    conn.start();
  }

  function saveAuth(signed) {
    auth = { access_token: signed.access_token, refresh_token: signed.refresh_token, user: signed.user };
    saved.save(auth);
  }

  async function prepare() {
    if (!auth.access_token) return signOut("");
    try {
      await api("/api/v1/admin/users/me", { token: auth.access_token });
      return auth.access_token;
    } catch (e) {
      if (!(e instanceof HttpError)) throw e;
      if (e.status === 403) return signOut("This account is not an agent or an admin.");
      if (e.status !== 401) throw e;
    }
    try {
      saveAuth(await api("/api/v1/auth/refresh", {
        method: "POST",
        body: { refresh_token: auth.refresh_token || "" },
      }));
      return auth.access_token;
    } catch (e) {
      if (!(e instanceof HttpError)) throw e;
      return signOut("Your sign-in has expired; sign in again.");
    }
  }

  function signOut(message) {
    saved.clear();
    auth = {};
    current = null;
    sessions.clear();
    queue = [];
    showLogin(message);
    return null;
  }

  $("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    $("login-button").disabled = true;
    try {
      const signed = await api("/api/v1/auth/login", {
        method: "POST",
        body: { email: $("email").value, password: $("password").value },
      });
      if (signed.user.role !== "agent" && signed.user.role !== "admin") {
        showLogin("This account is not an agent or an admin.");
        return;
      }
      saveAuth(signed);
      $("password").value = "";
      showDesk();
    } catch (err) {
      showLogin(err instanceof HttpError ? err.message : "The server cannot be reached; try again.");
    } finally {
      $("login-button").disabled = false;
    }
  });
  $("logout").addEventListener("click", () => signOut(""));

  // ---- frames --------------------------------------------------------------------------

  function onFrame(f) {
    switch (f.type) {
      case "snapshot":
        sessions.clear();
        listMax = f.list_max || listMax;
        for (const s of f.sessions || []) sessions.set(s.session_id, s);
        queue = f.queue || [];
        for (const s of queue) sessions.set(s.session_id, s);
        showAgents(f.agents_online || []);
        renderLists();
        renderHead();
        break;
      case "session_updates": {
        const changed = new Map((f.sessions || []).map((s) => [s.session_id, s]));
        for (const [id, s] of changed) sessions.set(id, s);
        queue = queue.map((s) => changed.get(s.session_id) || s);
        renderLists();
        if (changed.has(current)) renderHead();
        break;
      }
      case "queue":
        queue = f.sessions || [];
        for (const s of queue) sessions.set(s.session_id, s);
        renderLists();
        break;
      case "agents_online":
        showAgents(f.agents || []);
        break;
      case "error":
        onError(f);
        break;
      default:
        if (f.session_id && f.session_id === current) onConversationFrame(f);
    }
  }

  function onConversationFrame(f) {
    switch (f.type) {
      case "message":
        list.add(f);
        break;
      case "ack":
        list.ack(f.client_id, f.seq);
        break;
      case "token":
        list.token(f.reply_id, f.delta);
        break;
      case "reply_done":
        list.replyDone(f.reply_id, f.seq, f.interrupted);
        break;
      case "typing":
        if (f.role === "customer") {
          const t = $("typing");
          clearTimeout(peerTyping);
          t.hidden = !f.active;
          t.textContent = f.active ? "The customer is typing…" : "";
          if (f.active) peerTyping = setTimeout(() => (t.hidden = true), PEER_TYPING_SHOWN_MS);
        }
        break;
      case "watching":
        $("messages").dataset.loaded = "true";
        break;
      case "presence": {
        // Updates of the list come for its newest conversations only; the one open here may
        // be older, so its customer's coming and going is read from the conversation itself.
        const s = sessions.get(current);
        if (!s || !s.customer) break;
        const online = (f.members || []).some((m) => m.user_id === s.customer.user_id);
        if (online === s.customer.online) break;
        sessions.set(current, { ...s, customer: { ...s.customer, online } });
        renderLists();
        renderHead();
        break;
      }
      default:
        break;
    }
  }

  const errorTexts = {
    already_assigned: "Another agent has already taken this conversation.",
    not_assigned: "Only the agent who took this conversation (or an admin) can hand it back.",
    forbidden: "Your role does not allow that.",
    session_closed: "This conversation is closed.",
  };

  function onError(f) {
    toast(errorTexts[f.code] || f.message || f.code);
    if (f.client_id) {
      const node = document.querySelector('[data-client-id="' + CSS.escape(f.client_id) + '"]');
      if (node) node.classList.add("failed");
    }
  }

  function showAgents(agents) {
    $("agents").textContent =
      agents.length === 1 ? "1 agent online" : agents.length + " agents online";
    $("agents").title = agents.map((a) => a.email).join(", ");
  }

  // ---- lists ---------------------------------------------------------------------------

  function customerName(s) {
    const email = s.customer && s.customer.email;
    if (!email || /@guest\.invalid$/.test(email)) return "Guest " + String(s.customer && s.customer.user_id || "").slice(0, 8);
    return email;
  }

  /** Fills a row with a summary; the row element itself is kept across updates. */
  function fillRow(li, s) {
    li.className = "row" + (s.session_id === current ? " selected" : "");
    li.dataset.mode = s.mode;
    const top = el("div", "row-top");
    top.append(
      el("span", "dot " + (s.customer && s.customer.online ? "online" : "away")),
      el("span", "row-title", s.title || "Untitled"),
      el("span", "badge mode-" + s.mode, s.mode === "human" ? "human" : "AI"),
    );
    if (s.status !== "active") top.append(el("span", "badge status", s.status));
    const meta = el("div", "row-meta");
    meta.append(el("span", "", customerName(s)));
    if (s.assigned_agent) meta.append(el("span", "", "with " + s.assigned_agent.email));
    const since = s.human_requested_at && s.mode !== "human" ? s.human_requested_at : s.waiting_since;
    if (since) {
      const wait = el("span", "wait");
      wait.dataset.since = since;
      meta.append(wait);
    }
    const parts = [top, meta];
    if (s.last_message) {
      const who = { user: "Customer", assistant: "AI", agent: "Agent", system: "System" }[s.last_message.role] || s.last_message.role;
      parts.push(el("div", "row-last", who + ": " + s.last_message.content));
    }
    li.replaceChildren(...parts);
  }

  function newRow(id) {
    const li = el("li", "row");
    li.dataset.sessionId = id;
    li.tabIndex = 0;
    li.addEventListener("click", () => watch(id));
    li.addEventListener("keydown", (e) => {
      if (e.key === "Enter") watch(id);
    });
    return li;
  }

  /** Shows `items` in `ul` in order, reusing the rows already there (no flicker, focus kept). */
  function renderRows(ul, items) {
    const old = new Map([...ul.children].map((li) => [li.dataset.sessionId, li]));
    items.forEach((s, i) => {
      const li = old.get(s.session_id) || newRow(s.session_id);
      old.delete(s.session_id);
      fillRow(li, s);
      if (ul.children[i] !== li) ul.insertBefore(li, ul.children[i] || null);
    });
    for (const li of old.values()) li.remove();
  }

  function renderLists() {
    const live = [...sessions.values()]
      .filter((s) => s.status === "active" || s.session_id === current)
      // Newest first, as the server orders them (the same time: the larger id first).
      .sort(
        (a, b) =>
          String(b.updated_at).localeCompare(String(a.updated_at)) ||
          String(b.session_id).localeCompare(String(a.session_id)),
      )
      .slice(0, listMax);
    renderRows($("sessions"), live);
    $("sessions-count").textContent = String(live.length);
    renderRows($("queue"), queue);
    $("queue-count").textContent = String(queue.length);
    tick();
  }

  /** Waiting times count up live. */
  function tick() {
    const now = Date.now();
    for (const node of document.querySelectorAll(".wait[data-since]")) {
      node.textContent = "waiting " + duration(now - Date.parse(node.dataset.since));
    }
  }
  setInterval(tick, 1000);

  // ---- one conversation ----------------------------------------------------------------

  function watch(id) {
    if (current === id) return;
    if (current) conn.send({ type: "unwatch", session_id: current });
    current = id;
    list.reset();
    delete $("messages").dataset.loaded;
    $("typing").hidden = true;
    $("conversation").hidden = false;
    $("empty").hidden = true;
    conn.send({ type: "watch", session_id: id });
    renderLists();
    renderHead();
  }

  function renderHead() {
    if (!current) return;
    const s = sessions.get(current);
    $("conversation").dataset.sessionId = current;
    if (!s) {
      $("conv-title").textContent = "Conversation " + current.slice(0, 8);
      $("conv-meta").textContent = "";
      return;
    }
    $("conv-title").textContent = s.title || "Untitled";
    const parts = [customerName(s), s.customer && s.customer.online ? "online" : "away", s.status];
    if (s.assigned_agent) parts.push("taken by " + s.assigned_agent.email);
    $("conv-meta").textContent = parts.join(" · ");
    $("conv-mode").className = "badge mode-" + s.mode;
    $("conv-mode").textContent = s.mode === "human" ? "Human" : "AI";
    const mine = s.assigned_agent && auth.user && s.assigned_agent.user_id === auth.user.id;
    const admin = auth.user && auth.user.role === "admin";
    const active = s.status === "active";
    $("takeover").disabled = !active || (s.mode === "human" && mine);
    $("release").disabled = s.mode !== "human" || !(mine || admin);
    $("close").disabled = !active;
    $("reply-send").disabled = !active;
  }

  function action(type) {
    if (current && !conn.send({ type, session_id: current })) {
      toast("Not connected; try again in a moment.");
    }
  }
  $("takeover").addEventListener("click", () => action("takeover"));
  $("release").addEventListener("click", () => action("release"));
  $("close").addEventListener("click", () => action("close"));

  function sendReply() {
    const content = $("reply").value.trim();
    if (!content || !current) return;
    const id = clientId();
    if (!conn.send({ type: "send", session_id: current, client_id: id, content })) {
      toast("Not connected; your answer was kept, send it again in a moment.");
      return;
    }
    list.addPending(id, "agent", content);
    $("reply").value = "";
  }
  $("reply-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sendReply();
  });
  $("reply").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      sendReply();
    }
  });

  // ---- search --------------------------------------------------------------------------

  /** A snippet whose text is HTML-escaped and whose only markup is <mark>: rebuilt as nodes. */
  function snippetNodes(snippet) {
    const unescape = (t) =>
      t.replace(/&(lt|gt|quot|#39|#x27|amp);/g, (_, e) =>
        ({ lt: "<", gt: ">", quot: '"', "#39": "'", "#x27": "'", amp: "&" })[e]);
    const nodes = [];
    String(snippet || "").split(/(<mark>.*?<\/mark>)/s).forEach((part) => {
      const m = /^<mark>(.*)<\/mark>$/s.exec(part);
      if (m) nodes.push(el("mark", "", unescape(m[1])));
      else if (part) nodes.push(document.createTextNode(unescape(part)));
    });
    return nodes;
  }

  async function search(more) {
    if (!more) {
      searchQuery = $("search").value.trim();
      searchCursor = null;
      $("results").replaceChildren();
    }
    if (!searchQuery) {
      $("results-box").hidden = true;
      return;
    }
    $("results-box").hidden = false;
    let path = "/api/v1/admin/chat/search?q=" + encodeURIComponent(searchQuery);
    if (searchCursor) path += "&cursor=" + encodeURIComponent(searchCursor);
    try {
      const page = await api(path, { token: auth.access_token });
      for (const r of page.results || []) {
        const li = el("li", "row result");
        li.dataset.sessionId = r.session_id;
        li.tabIndex = 0;
        const top = el("div", "row-top");
        top.append(el("span", "row-title", r.session_title || "Untitled"),
          el("span", "muted", r.role + " · #" + r.seq));
        const snip = el("div", "row-last");
        snip.append(...snippetNodes(r.snippet));
        li.append(top, snip);
        li.addEventListener("click", () => watch(r.session_id));
        $("results").append(li);
      }
      if (!more && !(page.results || []).length) {
        $("results").append(el("li", "muted", "Nothing found."));
      }
      searchCursor = page.next_cursor || null;
      $("results-more").hidden = !searchCursor;
    } catch (e) {
      toast("Search failed: " + (e.message || "the server cannot be reached"));
    }
  }
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    search(false);
  });
  $("results-more").addEventListener("click", () => search(true));
  $("results-clear").addEventListener("click", () => {
    $("search").value = "";
    search(false);
  });

  if (auth.access_token) showDesk();
  else showLogin("");
})();
