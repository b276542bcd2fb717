// Conclave's dashboard: one tenant's view, live from GET /v1/events.
//
// EventSource cannot send an Authorization header, so the stream is read with fetch()
// and a ReadableStream, the bearer token in the header like every other request. The
// token comes from the page's form or from the URL fragment (#token=...), which a
// browser never sends to the server; it is kept in sessionStorage (this tab only) and
// the fragment is removed from the address bar at once.
//
// Order of a (re)connection: the stream first, then, once the server says it is
// connected (its baseline is taken), a snapshot of the read models; the stream is not
// read meanwhile, so the events after it are applied on top of the snapshot. Tasks and agents then change only from
// the stream; pools and the status are re-read (at most twice a second) when the
// stream says something changed, since they are counts the events do not carry.
//
// Everything shown is set with textContent: task ids, errors and pool names are
// tenants' text, never markup.
"use strict";

(() => {
  const TOKEN_KEY = "conclave.token";
  const RECENT_TASKS = 25;
  const RECENT_FAILURES = 15;
  const MAX_AGENT_ROWS = 40;
  const REFRESH_MS = 500;
  const MAX_RETRY_MS = 10000;
  const FAILED = new Set(["dead_lettered", "retrying", "expired", "dependency_failed"]);
  const PRIORITIES = ["critical", "high", "normal", "low"];

  const $ = (id) => document.getElementById(id);
  let token = null;
  let tasks = new Map(); // task_id -> what is known of it
  let order = []; // recent task ids, newest first
  let failures = []; // failed task ids, newest first
  let agents = new Map(); // agent_id -> agent
  let controller = null;

  class Unauthorized extends Error {}

  // --- the token ----------------------------------------------------------------------

  function takeToken() {
    const fragment = new URLSearchParams(location.hash.slice(1));
    const given = fragment.get("token");
    if (given) {
      sessionStorage.setItem(TOKEN_KEY, given);
      history.replaceState(null, "", location.pathname + location.search);
    }
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function showLogin(message) {
    if (controller) controller.abort();
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    $("board").hidden = true;
    $("forget").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    setLive(false, "not connected");
  }

  function start(withToken) {
    token = withToken;
    $("login").hidden = true;
    $("board").hidden = false;
    $("forget").hidden = false;
    run();
  }

  // --- HTTP ---------------------------------------------------------------------------

  async function api(path) {
    const answer = await fetch(path, {
      headers: { Authorization: "Bearer " + token },
      cache: "no-store",
    });
    if (answer.status === 401) throw new Unauthorized();
    if (!answer.ok) throw new Error(path + ": HTTP " + answer.status);
    return answer.json();
  }

  // Calls `load` at most every REFRESH_MS, the last call always honoured.
  function throttled(load) {
    let timer = null;
    let again = false;
    const fire = async () => {
      again = false;
      try {
        await load();
      } catch (error) {
        if (error instanceof Unauthorized) showLogin("the token was refused (401)");
      }
      timer = setTimeout(() => {
        timer = null;
        if (again) schedule();
      }, REFRESH_MS);
    };
    const schedule = () => {
      if (timer === null) {
        timer = -1;
        fire();
      } else {
        again = true;
      }
    };
    return schedule;
  }

  const refreshPools = throttled(async () => renderPools(await api("/v1/pools")));
  const refreshStatus = throttled(async () => renderStatus(await api("/v1/status")));

  // --- the live stream ----------------------------------------------------------------

  async function stream(signal, onConnected) {
    const answer = await fetch("/v1/events", {
      headers: { Authorization: "Bearer " + token, Accept: "text/event-stream" },
      cache: "no-store",
      signal,
    });
    if (answer.status === 401) throw new Unauthorized();
    if (!answer.ok || !answer.body) throw new Error("/v1/events: HTTP " + answer.status);
    const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let kind = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) {
            if (line.startsWith(": connected")) await onConnected();
            continue;
          }
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") kind = text;
          else if (field === "data") data.push(text);
        }
        if (data.length) onEvent(kind, JSON.parse(data.join("\n")));
      }
    }
  }

  function onEvent(kind, data) {
    if (kind === "task") {
      taskChanged(data);
      refreshPools();
    } else if (kind === "agent") {
      agents.set(data.agent_id, { ...agents.get(data.agent_id), ...data });
      renderAgents();
      refreshPools();
    } else if (kind === "witness") {
      renderHead(data.head, data.hash, data.recorded_at);
      refreshStatus();
    } else if (kind === "error") {
      setLive(false, data.detail || "stream error");
    }
  }

  async function snapshot() {
    const [status, pools, agentList, recent, dead, retrying] = await Promise.all([
      api("/v1/status"),
      api("/v1/pools"),
      api("/v1/agents"),
      api("/v1/tasks?limit=" + RECENT_TASKS),
      api("/v1/tasks?status=dead_lettered&limit=" + RECENT_FAILURES),
      api("/v1/tasks?status=retrying&limit=" + RECENT_FAILURES),
    ]);
    tasks = new Map();
    for (const t of [...recent.tasks, ...dead.tasks, ...retrying.tasks]) tasks.set(t.task_id, t);
    order = recent.tasks.map((t) => t.task_id);
    failures = [...retrying.tasks, ...dead.tasks]
      .sort((a, b) => (b.finished_at || b.queued_at) - (a.finished_at || a.queued_at))
      .map((t) => t.task_id)
      .slice(0, RECENT_FAILURES);
    agents = new Map(agentList.map((a) => [a.agent_id, a]));
    renderStatus(status);
    renderPools(pools);
    renderAgents();
    renderTasks();
  }

  async function run() {
    let delay = 500;
    for (;;) {
      controller = new AbortController();
      const { signal } = controller;
      try {
        await stream(signal, async () => {
          await snapshot();
          setLive(true, "live");
          delay = 500;
        });
      } catch (error) {
        if (signal.aborted) return;
        if (error instanceof Unauthorized) {
          showLogin("the token was refused (401)");
          return;
        }
      }
      if (signal.aborted) return;
      setLive(false, "reconnecting");
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, MAX_RETRY_MS);
    }
  }

  // --- the model ----------------------------------------------------------------------

  function taskChanged(change) {
    const known = tasks.get(change.task_id);
    tasks.set(change.task_id, { ...known, ...change });
    if (!order.includes(change.task_id)) {
      order.unshift(change.task_id);
      for (const dropped of order.splice(RECENT_TASKS)) {
        if (!failures.includes(dropped)) tasks.delete(dropped);
      }
    }
    if (FAILED.has(change.status)) {
      failures = [change.task_id, ...failures.filter((id) => id !== change.task_id)];
      failures.splice(RECENT_FAILURES);
    }
    renderTasks(change.task_id);
  }

  // --- rendering ----------------------------------------------------------------------

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "-" : String(text);
    if (className) td.className = className;
    return td;
  }

  function fill(tableId, rows) {
    const body = $(tableId).tBodies[0];
    body.replaceChildren(...rows);
  }

  function when(us) {
    if (!us) return "-";
    return new Date(us / 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
  }

  function setLive(on, text) {
    const live = $("live");
    live.className = on ? "on" : "off";
    live.textContent = text;
  }

  function renderHead(head, hash, at) {
    $("witness-head").textContent = "#" + head;
    $("witness-hash").textContent = hash ? hash.slice(0, 16) : "";
    $("witness-at").textContent = when(at);
  }

  function renderStatus(status) {
    renderHead(status.witness_head, status.witness_head_hash, status.witness_head_at);
    $("checkpoint").textContent =
      status.checkpoint_size === null
        ? "none yet"
        : `${status.checkpoint_size} entries, ${when(status.checkpoint_at)} (${status.checkpoint_origin})`;
    $("dead-hour").textContent = String(status.dead_lettered_last_hour);
    const halt = $("halt");
    halt.hidden = status.halt_reason === null;
    halt.textContent = status.halt_reason === null ? "" : "HALTED: " + status.halt_reason;
  }

  function renderPools(pools) {
    fill(
      "pools",
      pools.map((p) => {
        const tr = document.createElement("tr");
        tr.dataset.pool = p.pool;
        tr.append(
          cell(p.pool),
          cell(p.agents, "num"),
          cell(p.capacity + (p.default_capacity ? "*" : ""), "num"),
          cell(p.in_flight, "num"),
          ...PRIORITIES.map((q) => cell(p.queued[q] || 0, "num")),
          cell(p.waiting, "num"),
          cell(p.retrying, "num"),
          cell(p.completed, "num"),
          cell(p.dead_lettered, "num"),
        );
        return tr;
      }),
    );
  }

  function renderAgents() {
    const counts = new Map();
    for (const a of agents.values()) counts.set(a.state, (counts.get(a.state) || 0) + 1);
    $("agent-states").replaceChildren(
      ...[...counts.entries()].sort().map(([state, n]) => {
        const li = document.createElement("li");
        li.className = "state-" + state;
        li.dataset.state = state;
        li.textContent = `${state} ${n}`;
        return li;
      }),
    );
    // the troubled and the busy first, then the idle, then the retired (gone on purpose:
    // their hosts stopped, or their pools shrank); a fleet of a thousand is counted above,
    // not listed
    const ranks = { busy: 1, idle: 2, retired: 3 };
    const rank = (a) => ranks[a.state] || 0;
    const sorted = [...agents.values()].sort(
      (a, b) => rank(a) - rank(b) || (a.agent_id < b.agent_id ? -1 : 1),
    );
    const rows = sorted.slice(0, MAX_AGENT_ROWS).map((a) => {
      const tr = document.createElement("tr");
      tr.dataset.agentId = a.agent_id;
      tr.dataset.state = a.state;
      tr.append(cell(a.agent_id), cell(a.pool), cell(a.state, "state-" + a.state));
      tr.append(cell(a.current_task_id));
      return tr;
    });
    if (sorted.length > MAX_AGENT_ROWS) {
      const more = document.createElement("tr");
      more.append(cell(`and ${sorted.length - MAX_AGENT_ROWS} more`, "note"));
      rows.push(more);
    }
    fill("agents", rows);
  }

  function taskRow(t, columns, fresh) {
    const tr = document.createElement("tr");
    tr.dataset.taskId = t.task_id;
    tr.dataset.status = t.status;
    if (t.task_id === fresh) tr.className = "fresh";
    tr.append(...columns.map(([value, className]) => cell(value, className)));
    return tr;
  }

  function renderTasks(fresh) {
    const status = (t) => [t.status, "status-" + t.status];
    fill(
      "tasks",
      order.map((id) => {
        const t = tasks.get(id);
        const columns = [[t.task_id], status(t), [t.pool], [t.attempt, "num"], [t.agent_id]];
        return taskRow(t, [...columns, [when(t.finished_at)]], fresh);
      }),
    );
    fill(
      "failures",
      failures.map((id) => {
        const t = tasks.get(id);
        const columns = [[t.task_id], status(t), [t.attempt, "num"], [t.error, "error"]];
        return taskRow(t, [...columns, [when(t.finished_at)]], fresh);
      }),
    );
  }

  // --- wiring -------------------------------------------------------------------------

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const given = $("token-input").value.trim();
    $("token-input").value = "";
    if (!given) return;
    sessionStorage.setItem(TOKEN_KEY, given);
    start(given);
  });
  $("forget").addEventListener("click", () => showLogin(""));

  const stored = takeToken();
  if (stored) start(stored);
  else showLogin("");
})();
