// Lead Writer console: one page over the JSON API, no build step, nothing loaded from elsewhere.
//
// - The key lives in sessionStorage only (never in a URL, a cookie or local storage) and goes out only as
//   `Authorization: Bearer` to this server. GET /api/whoami says whose key it is.
// - Every value from the API reaches the page through textContent or an attribute; none is parsed as HTML.
// - What is shown is decided by the key's role: each panel and each action names the roles that may
//   use it, so a publisher key never sees a control the API would refuse. New panels (edit and resend,
//   archive, a lead's journey) are added to PANELS, new per-lead actions to LEAD_ACTIONS.
"use strict";

(() => {
  const KEY_STORAGE = "leadwriter.key";
  const LIST_LIMIT = 1000;

  // Dead-letter reasons, what they mean and who fixes them (the runbook's table).
  const REASONS = {
    InvalidLead: { fixer: "nobody", meaning: "The body is not a lead (bad JSON, wrong types, no contact).", action: "Inspect, then purge." },
    CredentialsMissing: { fixer: "publisher", meaning: "No connection is stored for the publisher.", action: "The publisher stores one; its leads are replayed automatically." },
    CredentialsRejected: { fixer: "publisher", meaning: "Entra refused the credentials (wrong password, MFA, disabled account, bad secret).", action: "The publisher rotates them; its leads are replayed automatically." },
    SolutionMissing: { fixer: "publisher", meaning: "The Lead Writer solution is not installed in the CRM.", action: "The publisher installs it." },
    SolutionVersionUnsupported: { fixer: "publisher", meaning: "The installed solution is older than the minimum.", action: "The publisher upgrades it." },
    PermissionDenied: { fixer: "publisher", meaning: "The CRM answered 401/403: the Lead Writer role is not assigned.", action: "The publisher assigns the role." },
    LeadRejected: { fixer: "ops", meaning: "The CRM refused this lead (400).", action: "Ops read the description, then replay or purge." },
    RetriesExhausted: { fixer: "ops", meaning: "Transient failures outlasted the retry schedule.", action: "Ops check the cause is gone, then replay." },
    MaxDeliveryCountExceeded: { fixer: "ops", meaning: "Service Bus delivered it 10 times without it being settled.", action: "Ops find the crash, then replay." },
    TTLExpiredException: { fixer: "ops", meaning: "Service Bus: it waited longer than its time to live.", action: "Ops replay it if the lead is still wanted." },
    Unknown: { fixer: "ops", meaning: "Dead-lettered by something other than Lead Writer.", action: "Ops inspect, then replay or purge." },
  };
  const FIXER_LABEL = { publisher: "Publisher fixes it", ops: "Ops fix it", nobody: "Nobody: inspect / purge" };

  const state = { key: null, who: null, stats: null, deadLetters: [], archived: [], statuses: new Map(), publisherFilter: null, journey: null };
  // Dead letters whose body a person may correct and resend (the API refuses the others with 409).
  const EDITABLE_REASONS = new Set(["InvalidLead", "LeadRejected"]);

  // -- DOM helpers -----------------------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const SVG_NS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    return node;
  }

  function when(iso) {
    if (!iso) return "never";
    const date = new Date(iso);
    if (Number.isNaN(date.getTime())) return String(iso);
    return date.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z").replace(/:\d\dZ$/, "Z");
  }

  function count(value, { bad = true } = {}) {
    const n = Number(value) || 0;
    return el("span", { class: n > 0 && bad ? "count nonzero" : "count", text: String(n) });
  }

  function reasonInfo(reason) {
    return REASONS[reason] || REASONS.Unknown;
  }

  function notice(text, kind = "info") {
    const node = $("notice");
    node.textContent = text;
    node.className = `notice ${kind}`;
    node.hidden = !text;
  }

  // -- API -------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, body) {
      super(message);
      this.status = status;
      this.body = body;
    }
  }

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${state.key}`, Accept: "application/json" };
    const init = { method, headers, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let answer;
    try {
      answer = await fetch(path, init);
    } catch (error) {
      throw new ApiError(0, "The server cannot be reached.", null);
    }
    const text = await answer.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (error) {
      data = null;
    }
    if (!answer.ok) {
      const message = (data && (data.error || data.message)) || `HTTP ${answer.status}`;
      throw new ApiError(answer.status, message, data);
    }
    return data;
  }

  // -- session ---------------------------------------------------------------------------------------

  function showSignin(error) {
    state.key = null;
    state.who = null;
    $("session").hidden = true;
    $("app").hidden = true;
    $("app").replaceChildren();
    notice("");
    $("signin").hidden = false;
    const message = $("signin-error");
    message.textContent = error || "";
    message.hidden = !error;
    $("key").value = "";
    $("key").focus();
  }

  async function signIn(key) {
    state.key = key;
    try {
      state.who = await api("GET", "/api/whoami");
    } catch (error) {
      sessionStorage.removeItem(KEY_STORAGE);
      if (error.status === 401) showSignin("That key is not valid. Check it and try again.");
      else showSignin(`Could not sign in: ${error.message}`);
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    $("signin").hidden = true;
    $("signin-error").hidden = true;
    $("session").hidden = false;
    $("who").textContent = state.who.role === "admin" ? "Admin" : `Publisher ${state.who.publisherId}`;
    $("who").dataset.role = state.who.role;
    await refresh();
  }

  function signOut() {
    sessionStorage.removeItem(KEY_STORAGE);
    showSignin("");
  }

  // -- loading ---------------------------------------------------------------------------------------

  async function load() {
    state.statuses = new Map();
    if (state.who.role === "admin") {
      const [stats, listing] = await Promise.all([
        api("GET", "/api/stats"),
        api("GET", `/api/deadletters?limit=${LIST_LIMIT}`),
      ]);
      state.stats = stats;
      state.deadLetters = listing.items || [];
      try {
        state.archived = (await api("GET", `/api/deadletters/archived?limit=${LIST_LIMIT}`)).items || [];
      } catch (error) {
        if (error.status === 401) throw error;
        state.archived = [];
      }
      const publishers = new Set();
      for (const failing of stats.publishersFailing || []) publishers.add(failing.publisherId);
      for (const item of state.deadLetters) if (item.publisherId) publishers.add(item.publisherId);
      if (state.publisherFilter) publishers.add(state.publisherFilter);
      const ids = [...publishers].sort();
      const answers = await Promise.all(ids.map((id) => statusOf(id)));
      ids.forEach((id, n) => state.statuses.set(id, answers[n]));
    } else {
      state.stats = null;
      state.deadLetters = [];
      state.archived = [];
      const id = state.who.publisherId;
      state.statuses.set(id, await statusOf(id));
    }
  }

  async function statusOf(publisherId) {
    try {
      return await api("GET", `/api/publishers/${encodeURIComponent(publisherId)}/status`);
    } catch (error) {
      if (error.status === 401) throw error; // the key itself stopped working: back to sign-in
      return { publisherId, error: error.message };
    }
  }

  async function refresh() {
    notice("Loading…");
    try {
      await load();
    } catch (error) {
      if (error.status === 401) {
        sessionStorage.removeItem(KEY_STORAGE);
        showSignin("The key is no longer valid. Sign in again.");
        return;
      }
      notice(`Could not load: ${error.message}`, "error");
      return;
    }
    notice("");
    render();
  }

  // -- panels ----------------------------------------------------------------------------------------

  const BOTH = ["admin", "publisher"];
  const PANELS = [
    { id: "health", title: "Delivery health", roles: BOTH, render: renderHealth },
    { id: "chart", title: "Dead letters by reason", roles: BOTH, render: renderChart },
    { id: "queues", title: "Queues", roles: ["admin"], render: renderQueues },
    { id: "deadletters", title: "Dead letters", roles: ["admin"], render: renderDeadLetters, wide: true },
    { id: "journey", title: "A lead's journey", roles: BOTH, render: renderJourney, wide: true },
    { id: "archive", title: "Archived dead letters", roles: ["admin"], render: renderArchive, wide: true },
    { id: "reasons", title: "Who fixes what", roles: BOTH, render: renderReasons, wide: true },
  ];

  // Actions on one dead letter (its detail) and on a group of them. `applies` (optional) says which
  // selections an action makes sense for: edit and resend takes one InvalidLead or LeadRejected letter.
  const single = (items) => items.length === 1;
  const LEAD_ACTIONS = [
    { id: "replay", label: "Replay…", roles: ["admin"], run: (items) => previewReplay(items) },
    {
      id: "resend",
      label: "Edit and resend…",
      roles: ["admin"],
      applies: (items) => single(items) && EDITABLE_REASONS.has(items[0].reason),
      run: (items) => editAndResend(items[0]),
    },
    {
      id: "journey",
      label: "Journey",
      roles: ["admin"],
      applies: (items) => single(items) && Boolean(items[0].leadId && items[0].publisherId),
      run: (items) => showJourney(items[0].leadId, items[0].publisherId),
    },
    { id: "archive", label: "Archive…", roles: ["admin"], run: (items) => previewArchive(items) },
    { id: "purge", label: "Purge…", roles: ["admin"], run: (items) => previewPurge(items), danger: true },
  ];

  function allowed(entry) {
    return entry.roles.includes(state.who.role);
  }

  function applies(action, items) {
    return allowed(action) && (!action.applies || action.applies(items));
  }

  function render() {
    const root = $("app");
    const panels = PANELS.filter(allowed).map((panel) => {
      const body = panel.render();
      if (!body) return null;
      return el(
        "section",
        { class: panel.wide ? "card panel wide" : "card panel", id: `panel-${panel.id}`, "aria-labelledby": `title-${panel.id}` },
        el("h2", { id: `title-${panel.id}`, text: panel.title }),
        body,
      );
    });
    root.className = `app role-${state.who.role}`;
    root.replaceChildren(...panels.filter(Boolean));
    root.hidden = false;
  }

  function pendingTotal(status) {
    if (!status.pending) return null;
    return Object.values(status.pending).reduce((sum, n) => sum + (Number(n) || 0), 0);
  }

  function renderHealth() {
    const list = el("div", { class: "publishers" });
    if (state.statuses.size === 0) {
      list.append(el("p", { class: "muted", text: "No publisher has dead letters or failing deliveries." }));
    }
    for (const [id, status] of state.statuses) list.append(publisherCard(id, status));
    const parts = [list];
    if (state.who.role === "admin") {
      const input = el("input", { id: "lookup", type: "text", placeholder: "publisher id", "aria-label": "Publisher id", autocomplete: "off" });
      const form = el(
        "form",
        {
          class: "row lookup",
          onsubmit: async (event) => {
            event.preventDefault();
            const id = input.value.trim();
            if (!id) return;
            state.publisherFilter = id;
            await refresh();
          },
        },
        input,
        el("button", { type: "submit", class: "secondary", text: "Show publisher" }),
      );
      parts.unshift(form);
    }
    return el("div", {}, ...parts);
  }

  function publisherCard(id, status) {
    const card = el("article", { class: "publisher", "data-publisher": id });
    card.append(el("h3", { text: id }));
    if (status.error) {
      card.append(el("p", { class: "error", text: status.error }));
      return card;
    }
    const pending = pendingTotal(status);
    const total = Number(status.deadLettersTotal) || 0;
    const health = total > 0 || (status.consecutiveConfigFailures || 0) > 0 ? "failing" : "ok";
    card.classList.add(health);
    const connection = status.connection || {};
    const connectionText = !connection.stored ? "none stored" : connection.verified ? "verified" : "not verified";
    card.append(
      el(
        "dl",
        { class: "facts" },
        el("dt", { text: "Delivered" }), el("dd", {}, count(status.delivered, { bad: false })),
        el("dt", { text: "Last delivery" }), el("dd", { text: when(status.lastDelivery) }),
        el("dt", { text: "Pending" }), el("dd", {}, pending === null ? el("span", { class: "muted", text: "n/a" }) : count(pending, { bad: false })),
        el("dt", { text: "Waiting for a retry" }),
        el("dd", {}, count(status.waitingForRetry || 0, { bad: false }),
          status.nextRetryAt ? el("span", { class: "muted", text: ` next ${when(status.nextRetryAt)}` }) : null),
        el("dt", { text: "Dead letters" }), el("dd", {}, count(total)),
        el("dt", { text: "Connection" }), el("dd", { class: `conn ${connectionText.replace(/ /g, "-")}`, text: connectionText }),
      ),
    );
    const reasons = Object.entries(status.deadLetters || {});
    if (reasons.length) {
      card.append(
        el(
          "ul",
          { class: "reasons" },
          reasons.map(([reason, n]) =>
            el(
              "li",
              { "data-reason": reason },
              el("span", { class: "reason", text: reason }),
              " ",
              count(n),
              " ",
              el("span", { class: `fixer fix-${reasonInfo(reason).fixer}`, text: FIXER_LABEL[reasonInfo(reason).fixer] }),
            ),
          ),
        ),
      );
    }
    if (status.lastError) {
      card.append(
        el(
          "p",
          { class: "last-error" },
          el("strong", { text: "Last error: " }),
          status.lastError.reason ? el("span", { class: "reason", text: status.lastError.reason }) : null,
          " ",
          status.lastError.message || "",
          el("span", { class: "muted", text: ` (${when(status.lastError.at)})` }),
        ),
      );
    }
    const actions = el("div", { class: "actions" });
    const result = el("p", { class: "result", role: "status", hidden: true });
    if (connection.stored) {
      actions.append(
        el("button", { type: "button", class: "secondary", "data-action": "verify", text: "Verify connection", onclick: (e) => testConnection(id, false, result, e.currentTarget) }),
        el("button", { type: "button", class: "secondary", "data-action": "test-lead", text: "Send test lead", onclick: (e) => testConnection(id, true, result, e.currentTarget) }),
      );
    }
    if (state.who.role === "admin" && total > 0) {
      actions.append(
        el("button", {
          type: "button",
          class: "link",
          text: state.publisherFilter === id ? "Show all dead letters" : "Only its dead letters",
          onclick: () => {
            state.publisherFilter = state.publisherFilter === id ? null : id;
            render();
            $("panel-deadletters")?.scrollIntoView({ behavior: "smooth" });
          },
        }),
      );
    }
    if (actions.childElementCount) card.append(actions, result);
    return card;
  }

  async function testConnection(publisherId, sendTestLead, result, button) {
    button.disabled = true;
    result.hidden = false;
    result.className = "result";
    result.textContent = sendTestLead ? "Writing a test lead…" : "Verifying…";
    const query = sendTestLead ? "?sendTestLead=true" : "";
    try {
      const answer = await api("POST", `/api/publishers/${encodeURIComponent(publisherId)}/connection/test${query}`);
      result.className = "result ok";
      if (answer.testLead) result.textContent = `Verified; test lead ${answer.testLead.marker || answer.testLead.leadId} written (record ${answer.testLead.recordId}).`;
      else result.textContent = `Verified at ${when(answer.verification && answer.verification.checkedAt)}.`;
    } catch (error) {
      result.className = "result error";
      const reason = error.body && error.body.reason ? `${error.body.reason}: ` : "";
      result.textContent = `${reason}${error.message}`;
    } finally {
      button.disabled = false;
    }
  }

  function reasonCounts() {
    const counts = {};
    if (state.who.role === "admin" && state.stats) {
      for (const queue of state.stats.queues || []) {
        for (const [reason, n] of Object.entries(queue.deadLetteredByReason || {})) counts[reason] = (counts[reason] || 0) + n;
      }
    } else {
      for (const status of state.statuses.values()) {
        for (const [reason, n] of Object.entries(status.deadLetters || {})) counts[reason] = (counts[reason] || 0) + n;
      }
    }
    return Object.entries(counts).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  }

  function renderChart() {
    const rows = reasonCounts();
    if (!rows.length) return el("p", { class: "muted", text: "No dead letters." });
    const max = Math.max(...rows.map(([, n]) => n));
    // Each reason's name above its bar, drawn at about phone width, so the text stays legible at
    // 390 px whatever the longest reason; CSS scales it up to 440 px.
    const rowHeight = 40;
    const width = 380;
    const barSpace = width - 40;
    const height = rows.length * rowHeight + 4;
    const chart = svg("svg", {
      class: "chart",
      viewBox: `0 0 ${width} ${height}`,
      role: "img",
      "aria-label": `Dead letters by reason: ${rows.map(([r, n]) => `${r} ${n}`).join(", ")}`,
      preserveAspectRatio: "xMinYMin meet",
    });
    rows.forEach(([reason, n], index) => {
      const y = index * rowHeight;
      const barWidth = Math.max(2, Math.round((n / max) * barSpace));
      chart.append(
        svg("text", { x: 0, y: y + 15, class: "chart-label" }, reason),
        svg("rect", { x: 0, y: y + 21, width: barWidth, height: 13, rx: 3, class: `bar fix-${reasonInfo(reason).fixer}` }),
        svg("text", { x: barWidth + 6, y: y + 32, class: "chart-value" }, String(n)),
      );
    });
    const legend = el(
      "p",
      { class: "legend" },
      ["publisher", "ops", "nobody"].map((fixer) => el("span", { class: `key fix-${fixer}`, text: FIXER_LABEL[fixer] })),
    );
    const note = el("p", {
      class: "muted small",
      text: "The status route counts deliveries but keeps no history, so this shows dead letters by reason.",
    });
    return el("div", {}, chart, legend, note);
  }

  function renderQueues() {
    const stats = state.stats;
    if (!stats) return null;
    const table = el(
      "table",
      { class: "queues" },
      el("thead", {}, el("tr", {}, ["Queue", "Active", "Scheduled", "Dead"].map((h) => el("th", { scope: "col", text: h })))),
      el(
        "tbody",
        {},
        (stats.queues || []).map((q) =>
          el(
            "tr",
            { "data-queue": q.queue },
            el("th", { scope: "row", text: q.queue }),
            el("td", {}, count(q.active, { bad: false })),
            el("td", {}, count(q.scheduled, { bad: false })),
            el("td", {}, count(q.deadLettered)),
          ),
        ),
      ),
    );
    return el("div", { class: "scroll" }, table);
  }

  function groupDeadLetters(items) {
    const byReason = new Map();
    for (const item of items) {
      const reason = item.reason || "Unknown";
      const publisher = item.publisherId || "—";
      if (!byReason.has(reason)) byReason.set(reason, new Map());
      const byPublisher = byReason.get(reason);
      if (!byPublisher.has(publisher)) byPublisher.set(publisher, []);
      byPublisher.get(publisher).push(item);
    }
    return [...byReason.entries()].sort((a, b) => total(b[1]) - total(a[1]) || a[0].localeCompare(b[0]));
  }

  function total(byPublisher) {
    let n = 0;
    for (const items of byPublisher.values()) n += items.length;
    return n;
  }

  function actionButtons(items, context) {
    return LEAD_ACTIONS.filter((action) => applies(action, items)).map((action) =>
      el("button", {
        type: "button",
        class: action.danger ? "secondary danger" : "secondary",
        "data-action": action.id,
        "aria-label": `${action.label.replace("…", "")} ${context}`,
        text: action.label,
        onclick: () => action.run(items),
      }),
    );
  }

  function renderDeadLetters() {
    const filter = state.publisherFilter;
    const items = filter ? state.deadLetters.filter((item) => item.publisherId === filter) : state.deadLetters;
    const parts = [];
    if (filter) {
      parts.push(
        el(
          "p",
          { class: "filter" },
          `Only publisher ${filter}. `,
          el("button", { type: "button", class: "link", text: "Show all", onclick: () => { state.publisherFilter = null; render(); } }),
        ),
      );
    }
    if (!items.length) {
      parts.push(el("p", { class: "muted", text: "No dead letters." }));
      return el("div", {}, ...parts);
    }
    if (state.deadLetters.length >= LIST_LIMIT) {
      parts.push(el("p", { class: "muted", text: `Showing the first ${LIST_LIMIT}; the queue counts above are complete.` }));
    }
    for (const [reason, byPublisher] of groupDeadLetters(items)) {
      const info = reasonInfo(reason);
      const group = el(
        "section",
        { class: "reason-group", "data-reason": reason },
        el(
          "header",
          {},
          el("h3", {}, el("span", { class: "reason", text: reason }), " ", count(total(byPublisher))),
          el("span", { class: `fixer fix-${info.fixer}`, text: FIXER_LABEL[info.fixer] }),
        ),
        el("p", { class: "muted small", text: `${info.meaning} ${info.action}` }),
      );
      const sorted = [...byPublisher.entries()].sort((a, b) => b[1].length - a[1].length || a[0].localeCompare(b[0]));
      for (const [publisher, list] of sorted) {
        group.append(
          el(
            "div",
            { class: "publisher-group", "data-publisher": publisher },
            el(
              "div",
              { class: "group-head" },
              el("span", { class: "group-title" }, el("strong", { text: publisher }), " ", count(list.length)),
              el("span", { class: "actions" }, actionButtons(list, `${list.length} ${reason} of ${publisher}`)),
            ),
            el("ul", { class: "letters" }, list.map((item) => letterRow(item))),
          ),
        );
      }
      parts.push(group);
    }
    return el("div", {}, ...parts);
  }

  function letterRow(item) {
    return el(
      "li",
      { class: "letter", "data-message-id": item.messageId },
      el(
        "button",
        { type: "button", class: "letter-open", title: "Show this dead letter", onclick: () => showDetail(item) },
        el("span", { class: "mono lead-id", text: item.leadId || item.messageId }),
        el("span", { class: "meta", text: `${item.queue} · ${when(item.enqueuedAt)} · attempts ${item.deliveryCount} · replays ${item.replayCount}` }),
      ),
    );
  }

  function renderReasons() {
    const rows = Object.entries(REASONS).map(([reason, info]) =>
      el(
        "tr",
        {},
        el("th", { scope: "row" }, el("span", { class: "reason", text: reason })),
        el("td", { text: info.meaning }),
        el("td", {}, el("span", { class: `fixer fix-${info.fixer}`, text: FIXER_LABEL[info.fixer] })),
      ),
    );
    return el(
      "details",
      {},
      el("summary", { text: "What each reason means and who fixes it" }),
      el(
        "div",
        { class: "scroll" },
        el(
          "table",
          { class: "reason-table" },
          el("thead", {}, el("tr", {}, ["Reason", "Meaning", "Fixed by"].map((h) => el("th", { scope: "col", text: h })))),
          el("tbody", {}, rows),
        ),
      ),
    );
  }


  // -- a lead's journey --------------------------------------------------------------------------------

  const ACTION_LABEL = { forwarded: "forwarded", delivered: "delivered", rescheduled: "retry later", "dead-lettered": "dead-lettered" };

  function renderJourney() {
    const lead = el("input", { id: "journey-lead", type: "text", placeholder: "lead id", "aria-label": "Lead id", autocomplete: "off", spellcheck: "false" });
    const fields = [lead];
    let publisher = null;
    if (state.who.role === "admin") {
      publisher = el("input", { id: "journey-publisher", type: "text", placeholder: "publisher id", "aria-label": "Publisher id", autocomplete: "off" });
      fields.push(publisher);
    }
    const result = el("div", { id: "journey-result" });
    const form = el(
      "form",
      {
        class: "row lookup",
        id: "journey-form",
        onsubmit: async (event) => {
          event.preventDefault();
          const leadId = lead.value.trim();
          if (!leadId) return;
          const publisherId = publisher ? publisher.value.trim() : state.who.publisherId;
          result.replaceChildren(await journeyView(leadId, publisherId));
        },
      },
      ...fields,
      el("button", { type: "submit", class: "secondary", text: "Show journey" }),
    );
    return el(
      "div",
      {},
      el("p", { class: "muted small", text: "Every settlement of one lead: stage, outcome, reason, attempt, time, and the CRM record once written." }),
      form,
      result,
    );
  }

  async function journeyView(leadId, publisherId) {
    const query = state.who.role === "admin" && publisherId ? `?publisherId=${encodeURIComponent(publisherId)}` : "";
    let journey;
    try {
      journey = await api("GET", `/api/leads/${encodeURIComponent(leadId)}${query}`);
    } catch (error) {
      const text = error.status === 404 ? `Nothing is recorded for lead ${leadId}.` : `Could not load the journey: ${error.message}`;
      return el("p", { class: error.status === 404 ? "muted journey-empty" : "error", text });
    }
    const rows = (journey.events || []).map((event) => {
      let detail = event.reason || "";
      if (event.recordId) detail = `record ${event.recordId}${event.created ? " (created)" : " (already there)"}`;
      else if (event.description) detail = detail ? `${detail}: ${event.description}` : event.description;
      if (event.delay !== undefined && event.delay !== null) detail = `${detail} (again in ${event.delay} s)`.trim();
      return el(
        "tr",
        { "data-action": event.action },
        el("td", { class: "mono", text: when(event.at) }),
        el("td", { text: event.stage }),
        el("td", {}, el("span", { class: `outcome outcome-${event.action}`, text: ACTION_LABEL[event.action] || event.action })),
        el("td", { text: String(event.attempt) + (event.replayCount ? ` (replay ${event.replayCount})` : "") }),
        el("td", { class: "detail", text: detail || "—" }),
      );
    });
    return el(
      "div",
      { class: "journey", "data-lead-id": journey.leadId, "data-state": journey.state },
      el(
        "p",
        { class: "journey-summary" },
        el("strong", { class: "mono", text: journey.leadId }),
        ` of ${journey.publisherId}: `,
        el("span", { class: `outcome outcome-${journey.state}`, text: journey.state }),
        journey.recordId ? el("span", { class: "mono", text: ` · CRM record ${journey.recordId}` }) : null,
      ),
      el(
        "div",
        { class: "scroll" },
        el(
          "table",
          { class: "journey-table" },
          el("thead", {}, el("tr", {}, ["At", "Stage", "Outcome", "Attempt", "Reason / record"].map((h) => el("th", { scope: "col", text: h })))),
          el("tbody", {}, rows),
        ),
      ),
    );
  }

  async function showJourney(leadId, publisherId) {
    openDialog(`Journey of ${leadId}`, [await journeyView(leadId, publisherId)], null);
  }

  // -- archive and restore -----------------------------------------------------------------------------

  function renderArchive() {
    const items = state.publisherFilter ? state.archived.filter((item) => item.publisherId === state.publisherFilter) : state.archived;
    if (!items.length) return el("p", { class: "muted", text: "Nothing archived. Archiving a dead letter keeps it here, restorable, for 30 days." });
    const list = el(
      "ul",
      { class: "letters archived" },
      items.map((item) =>
        el(
          "li",
          { class: "letter", "data-message-id": item.messageId },
          el(
            "div",
            { class: "archived-row" },
            el("span", { class: "mono lead-id", text: item.leadId || item.messageId }),
            el("span", { class: "meta", text: `${item.reason || "Unknown"} · ${item.publisherId || "—"} · ${item.queue} · archived ${when(item.archivedAt)} · until ${when(item.expiresAt)}` }),
            el("button", { type: "button", class: "secondary", "data-action": "restore", "aria-label": `Restore ${item.leadId || item.messageId}`, text: "Restore…", onclick: () => previewRestore([item]) }),
          ),
        ),
      ),
    );
    return el("div", {}, el("p", { class: "muted small", text: "Restoring sends the dead letter back to the queue it died on, as a replay does." }), list);
  }

  async function previewArchive(items) {
    const ids = items.map((item) => item.messageId);
    let plan;
    try {
      plan = await api("POST", "/api/deadletters/archive", { messageIds: ids, dryRun: true });
    } catch (error) {
      notice(`Dry run failed: ${error.message}`, "error");
      return;
    }
    const matched = plan.messageIds || [];
    const summary = el("p", {
      class: "preview-summary",
      text: `Dry run: ${plan.matched} dead letter(s) would be archived (restorable for 30 days), ${plan.refused || 0} too large to archive. Nothing has moved yet.`,
    });
    const list = el("ul", { class: "plan" }, matched.map((id) => el("li", { "data-message-id": id }, el("span", { class: "mono", text: id }))));
    const refusals = (plan.refusals || []).map((text) => el("p", { class: "error", text }));
    openDialog(`Archive ${matched.length} dead letter(s)?`, [summary, list, ...refusals], {
      label: `Archive ${matched.length}`,
      disabled: matched.length === 0,
      run: async () => {
        const result = await api("POST", "/api/deadletters/archive", { messageIds: matched });
        return `Archived ${result.archived} of ${result.matched}.`;
      },
    });
  }

  async function previewRestore(items) {
    const ids = items.map((item) => item.messageId);
    let plan;
    try {
      plan = await api("POST", "/api/deadletters/archived/restore", { messageIds: ids, dryRun: true });
    } catch (error) {
      notice(`Dry run failed: ${error.message}`, "error");
      return;
    }
    const steps = plan.plan || [];
    const summary = el("p", { class: "preview-summary", text: `Dry run: ${steps.length} would be sent back. Nothing has moved yet.` });
    const list = el(
      "ul",
      { class: "plan" },
      steps.map((step) =>
        el("li", { "data-message-id": step.messageId }, el("span", { class: "mono", text: step.messageId }), " → ", el("span", { class: "mono", text: `${step.queue} as ${step.newMessageId}` })),
      ),
    );
    openDialog(`Restore ${steps.length} dead letter(s)?`, [summary, list], {
      label: `Restore ${steps.length}`,
      disabled: steps.length === 0,
      run: async () => {
        const result = await api("POST", "/api/deadletters/archived/restore", { messageIds: steps.map((step) => step.messageId) });
        return `Restored ${result.restored} of ${result.matched}.`;
      },
    });
  }

  // -- edit and resend ---------------------------------------------------------------------------------

  function editAndResend(item) {
    const editor = el("textarea", { id: "resend-body", class: "editor mono", rows: 16, spellcheck: "false", "aria-label": "Corrected body (JSON)" });
    editor.value = JSON.stringify(item.body, null, 2);
    const error = el("p", { class: "dialog-error error", role: "alert", hidden: true });
    const help = el("p", {
      class: "muted small",
      text: `${item.reason}: ${item.description || ""} Correct the body below. It is checked as a lead before anything is sent; the dead letter stays until the corrected copy is sent to ${item.queue}.`,
    });
    openDialog(`Edit and resend ${item.leadId || item.messageId}`, [help, editor, error], {
      label: "Validate and resend",
      inline: true,
      run: async () => {
        let body;
        try {
          body = JSON.parse(editor.value);
        } catch (parseError) {
          throw new ApiError(422, `body: not valid JSON (${parseError.message})`, { field: "body" });
        }
        if (body === null || typeof body !== "object" || Array.isArray(body)) {
          throw new ApiError(422, "body: must be a JSON object", { field: "body" });
        }
        const result = await api("POST", `/api/deadletters/${encodeURIComponent(item.messageId)}/resend`, { body });
        return `Resent ${result.leadId} to ${result.queue} as ${result.newMessageId}.`;
      },
    });
    editor.focus();
  }

  // -- dialogs: detail, previews, confirmations --------------------------------------------------------

  let dialogConfirm = null;
  // True when a failed confirmation should stay in the dialog (edit and resend: fix and try again).
  let dialogInline = false;

  function openDialog(title, content, confirm) {
    const dialog = $("dialog");
    $("dialog-title").textContent = title;
    $("dialog-content").replaceChildren(...content);
    const button = $("dialog-confirm");
    dialogConfirm = confirm ? confirm.run : null;
    dialogInline = Boolean(confirm && confirm.inline);
    button.hidden = !confirm;
    if (confirm) {
      button.textContent = confirm.label;
      button.className = confirm.danger ? "danger" : "";
      button.disabled = Boolean(confirm.disabled);
    }
    $("dialog-cancel").textContent = confirm ? "Cancel" : "Close";
    if (!dialog.open) dialog.showModal();
  }

  function closeDialog() {
    dialogConfirm = null;
    const dialog = $("dialog");
    if (dialog.open) dialog.close();
  }

  function showDetail(item) {
    const info = reasonInfo(item.reason || "Unknown");
    const facts = el(
      "dl",
      { class: "facts detail" },
      [
        ["Lead id", item.leadId],
        ["Message id", item.messageId],
        ["Publisher", item.publisherId],
        ["Queue", item.queue],
        ["Reason", item.reason || "Unknown"],
        ["Who fixes it", FIXER_LABEL[info.fixer]],
        ["Description", item.description],
        ["Enqueued", when(item.enqueuedAt)],
        ["Attempts", item.deliveryCount],
        ["Replays", item.replayCount],
      ].flatMap(([name, value]) => [el("dt", { text: name }), el("dd", { class: name.endsWith("id") ? "mono" : null, text: value ?? "—" })]),
    );
    const body = el("pre", { class: "body", text: JSON.stringify(item.body, null, 2) });
    const actions = el("div", { class: "actions" }, actionButtons([item], item.leadId || item.messageId));
    openDialog(`Dead letter ${item.leadId || item.messageId}`, [facts, el("h3", { text: "Body" }), body, actions], null);
  }

  async function previewReplay(items) {
    const ids = items.map((item) => item.messageId);
    let plan;
    try {
      plan = await api("POST", "/api/deadletters/replay", { messageIds: ids, dryRun: true });
    } catch (error) {
      notice(`Dry run failed: ${error.message}`, "error");
      return;
    }
    const entries = plan.plan || [];
    const sendable = entries.filter((entry) => !entry.refused).map((entry) => entry.messageId);
    const list = el(
      "ul",
      { class: "plan" },
      entries.map((entry) =>
        el(
          "li",
          { class: entry.refused ? "refused" : null, "data-message-id": entry.messageId },
          el("span", { class: "mono", text: entry.messageId }),
          " → ",
          el("span", { class: "mono", text: `${entry.queue} as ${entry.newMessageId}` }),
          entry.refused ? el("span", { class: "error", text: ` refused: ${entry.refused}` }) : null,
        ),
      ),
    );
    const summary = el("p", {
      class: "preview-summary",
      text: `Dry run: ${plan.matched} match, ${sendable.length} would be sent again, ${plan.refused || 0} refused. Nothing has moved yet.`,
    });
    openDialog(`Replay ${sendable.length} dead letter(s)?`, [summary, list], {
      label: `Replay ${sendable.length}`,
      disabled: sendable.length === 0,
      run: async () => {
        const result = await api("POST", "/api/deadletters/replay", { messageIds: sendable });
        const extra = (result.errors || []).length ? `; ${result.errors.length} failed` : "";
        return `Replayed ${result.replayed} of ${result.matched}${extra}.`;
      },
    });
  }

  async function previewPurge(items) {
    // The API has no purge dry run: reading the same dead letters again is one (it changes nothing),
    // and the purge then names exactly the messages shown here.
    const wanted = new Set(items.map((item) => item.messageId));
    const publishers = new Set(items.map((item) => item.publisherId));
    const query = publishers.size === 1 && items[0].publisherId ? `&publisherId=${encodeURIComponent(items[0].publisherId)}` : "";
    let current;
    try {
      current = await api("GET", `/api/deadletters?limit=${LIST_LIMIT}${query}`);
    } catch (error) {
      notice(`Preview failed: ${error.message}`, "error");
      return;
    }
    const found = (current.items || []).filter((item) => wanted.has(item.messageId));
    const ids = found.map((item) => item.messageId);
    const summary = el("p", {
      class: "preview-summary",
      text: `Preview: ${ids.length} dead letter(s) would be deleted for good. Nothing has been deleted yet.`,
    });
    const list = el(
      "ul",
      { class: "plan" },
      found.map((item) =>
        el("li", { "data-message-id": item.messageId }, el("span", { class: "mono", text: item.leadId || item.messageId }), ` ${item.reason || "Unknown"} · ${item.publisherId || "—"}`),
      ),
    );
    openDialog(`Purge ${ids.length} dead letter(s)?`, [summary, list], {
      label: `Delete ${ids.length} for good`,
      danger: true,
      disabled: ids.length === 0,
      run: async () => {
        const result = await api("POST", "/api/deadletters/purge", { messageIds: ids, confirm: true });
        return `Purged ${result.purged} of ${result.matched}.`;
      },
    });
  }

  async function confirmDialog() {
    if (!dialogConfirm) return;
    const run = dialogConfirm;
    const button = $("dialog-confirm");
    button.disabled = true;
    try {
      const message = await run();
      closeDialog();
      await refresh();
      notice(message, "ok");
    } catch (error) {
      button.disabled = false;
      const inline = $("dialog-content").querySelector(".dialog-error");
      if (dialogInline && inline) {
        const field = error.body && error.body.field ? ` (field: ${error.body.field})` : "";
        inline.textContent = `Not sent: ${error.message}${field}`;
        inline.dataset.field = (error.body && error.body.field) || "";
        inline.hidden = false;
        return;
      }
      notice(`Failed: ${error.message}`, "error");
      closeDialog();
    }
  }

  // -- start -----------------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("signin-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("key").value.trim();
      $("key").value = "";
      if (!key) {
        showSignin("Enter a key.");
        return;
      }
      signIn(key);
    });
    $("signout").addEventListener("click", signOut);
    $("refresh").addEventListener("click", () => refresh());
    $("dialog-cancel").addEventListener("click", closeDialog);
    $("dialog-confirm").addEventListener("click", confirmDialog);
    const saved = sessionStorage.getItem(KEY_STORAGE);
    if (saved) signIn(saved);
    else showSignin("");
  });
})();
