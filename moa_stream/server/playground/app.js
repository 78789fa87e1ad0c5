// The moa-stream playground: runs a MoA through the server's public API and draws its progress.
//
// Everything comes from two requests any client can make: GET /v1/models, and
// POST /v1/chat/completions streamed with "X-MoA-Progress: text", whose SSE comment lines
// (": moa.progress {json}") carry the run's progress and whose data lines are the answer's
// ordinary OpenAI chunks. docs/server.md documents both.

const KEY_STORAGE = "moa-stream.api-key";
const PROGRESS_PREFIX = " moa.progress "; // a comment line, after its ":"
const PREFERRED = ["moa-quorum", "moa-wait-all"]; // defaults for the two model pickers

// Why a layer stopped waiting (layer.done's "reason"), in words.
const REASONS = {
  all: "every proposer finished",
  quorum: "enough proposers finished (quorum)",
  deadline: "the deadline passed",
  partial: "enough partial text to start (staircase)",
  degraded: "the policy could no longer be met; it went on with what it had",
};
const CUTS = {
  agreement: "the answers agreed, so the remaining layers were skipped",
  budget: "another layer would exceed the TTFT budget, so the remaining layers were skipped",
};

const $ = (selector, root = document) => root.querySelector(selector);

/**
 * A new element: `props` become attributes, "text" sets its text and "style" (an object) its
 * style through the CSSOM (the page's Content-Security-Policy refuses style attributes).
 */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "style") Object.assign(node.style, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

const seconds = (s) => (s === null || s === undefined ? "–" : `${s.toFixed(2)} s`);
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

/** Appends text to an element, growing its last text node rather than adding one per token. */
function appendText(node, text) {
  const last = node.lastChild;
  if (last && last.nodeType === Node.TEXT_NODE) last.appendData(text);
  else node.append(text);
}

/** Keeps a scrolling box pinned to its end while it grows, unless the reader scrolled up. */
function follow(box, grow) {
  const atEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 24;
  grow();
  if (atEnd) box.scrollTop = box.scrollHeight;
}

// -- the answer's smoothness ------------------------------------------------------------------
//
// Computed here from what the page received, not from the server's report: the gaps a reader
// sees are the browser's, and a restart is visible in the text whoever caused it.

/** The answer's sentences: split after ., ! or ? followed by white space. */
export function sentences(text) {
  return text
    .split(/(?<=[.!?])\s+/u)
    .map((s) => s.trim())
    .filter(Boolean);
}

/** A sentence's first `n` words, lowercased without punctuation; null if it has fewer. */
export function opening(sentence, n = 4) {
  const w = words(sentence);
  return w.length >= n ? w.slice(0, n).join(" ") : null;
}

/**
 * How many sentences restart the answer: their first four words (lowercased, without
 * punctuation) open an earlier sentence of the same answer. A staircase step that starts over
 * instead of continuing shows up here.
 */
export function countRestarts(text) {
  const seen = new Set();
  let restarts = 0;
  for (const sentence of sentences(text)) {
    const key = opening(sentence);
    if (key === null) continue;
    if (seen.has(key)) restarts += 1;
    else seen.add(key);
  }
  return restarts;
}

/** A sentence's words, lowercased without punctuation. */
function words(sentence) {
  return sentence
    .toLowerCase()
    .replace(/[^\p{L}\p{N}\s]/gu, "")
    .split(/\s+/u)
    .filter(Boolean);
}

/**
 * How many sentences repeat eight words in a row of an earlier sentence: the body of a loop,
 * which a list whose items open differently ("The fifth tip is to ..., The sixth tip is to
 * ...") hides from `countRestarts`.
 */
export function countLoops(text, n = 8) {
  const seen = new Set();
  let loops = 0;
  for (const sentence of sentences(text)) {
    const w = words(sentence);
    const runs = [];
    for (let i = 0; i + n <= w.length; i += 1) runs.push(w.slice(i, i + n).join(" "));
    if (runs.some((r) => seen.has(r))) loops += 1;
    for (const r of runs) seen.add(r);
  }
  return loops;
}

/** The longest time between two consecutive arrival times (seconds), or null under two. */
export function longestGap(times) {
  let longest = null;
  for (let i = 1; i < times.length; i += 1) {
    const gap = times[i] - times[i - 1];
    if (longest === null || gap > longest) longest = gap;
  }
  return longest;
}

// -- the API ----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

const api = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",

  headers(extra = {}) {
    return this.key ? { ...extra, Authorization: `Bearer ${this.key}` } : extra;
  },

  async error(response) {
    let message = `HTTP ${response.status}`;
    let code = null;
    try {
      const body = await response.json();
      if (body && body.error) {
        message = body.error.message || message;
        code = body.error.code || null;
      }
    } catch {
      // Not an OpenAI error body: the status says enough.
    }
    return new ApiError(response.status, message, code);
  },

  async models() {
    const response = await fetch("/v1/models", { headers: this.headers() });
    if (!response.ok) throw await this.error(response);
    return (await response.json()).data;
  },

  /** Streams a chat completion; yields {progress}, {content}, {usage} or {error} items. */
  async *chat(model, prompt, signal) {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: this.headers({ "Content-Type": "application/json", "X-MoA-Progress": "text" }),
      body: JSON.stringify({
        model,
        stream: true,
        stream_options: { include_usage: true },
        messages: [{ role: "user", content: prompt }],
      }),
      signal,
    });
    if (!response.ok) throw await this.error(response);
    for await (const event of sseEvents(response.body)) {
      if (event.comment !== undefined) {
        if (event.comment.startsWith(PROGRESS_PREFIX)) {
          yield { progress: JSON.parse(event.comment.slice(PROGRESS_PREFIX.length)) };
        }
        continue;
      }
      if (event.data === "[DONE]") return;
      const chunk = JSON.parse(event.data);
      if (chunk.error) {
        yield { error: chunk.error };
        continue;
      }
      if (chunk.usage) yield { usage: chunk.usage };
      for (const choice of chunk.choices || []) {
        const text = choice.delta && choice.delta.content;
        if (text) yield { content: text };
      }
    }
    throw new ApiError(0, "The stream ended before [DONE]: the connection was cut.", null);
  },
};

/** Server-sent events of a response body: {comment} per comment line, {data} per event. */
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let start = 0;
      for (let end = buffer.indexOf("\n"); end >= 0; end = buffer.indexOf("\n", start)) {
        let line = buffer.slice(start, end);
        start = end + 1;
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (data.length) yield { data: data.join("\n") };
          data = [];
        } else if (line.startsWith(":")) {
          yield { comment: line.slice(1) };
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        }
      }
      buffer = buffer.slice(start);
    }
  } finally {
    reader.releaseLock();
  }
}

// -- one run, drawn -----------------------------------------------------------------------------

class Lane {
  constructor({ kind, title, subtitle }) {
    this.badge = el("span", { class: "badge" });
    this.meta = el("p", { class: "lane-meta" });
    this.text = el("div", { class: "lane-text", tabindex: "0", "data-role": `${kind}-text` });
    this.name = el("span", { class: "lane-name", text: title });
    this.sub = el("span", { class: "lane-sub", text: subtitle || "" });
    this.root = el(
      "article",
      { class: `lane ${kind}` },
      el("div", { class: "lane-head" }, el("h4", {}, this.name, this.sub), this.badge),
      this.meta,
      this.text,
    );
    this.text.setAttribute("aria-label", `${title}: text`);
    this.tokens = 0;
    // Set once the lane has its final figure (proposer.done, proposer.failed, run.done): live
    // counts stop there.
    this.final = false;
    this.setStatus("waiting");
  }

  /** `status` (waiting, streaming, complete, partial, failed, cancelled) styles the lane. */
  setStatus(status, label) {
    this.status = status;
    this.root.dataset.status = status;
    this.badge.textContent = label || status;
  }

  append(text) {
    follow(this.text, () => appendText(this.text, text));
  }

  /** A mark at the current end of the text (CSS draws its label, so textContent stays the text). */
  mark(kind, label, title) {
    const mark = el("span", { class: `mark ${kind}`, "data-label": label, title, role: "img", "aria-label": title || label });
    follow(this.text, () => this.text.append(mark));
    return mark;
  }
}

class RunView {
  constructor(model, description) {
    this.model = model;
    this.lanes = new Map(); // "layer:index" -> Lane
    this.byAgent = new Map(); // "layer:agent" -> Lane
    this.layers = new Map(); // layer -> {section, grid}
    this.steps = [];
    this.items = 0;
    this.report = null;
    this.usage = null;
    this.clientTtft = null;
    // The answer as received, and when each chunk arrived (seconds since the request).
    this.answerText = "";
    this.chunkTimes = [];
    // aggregator.done's figure: every step's tokens, the one the header and the tiles show.
    this.answerTokens = null;
    // "layer:index" of every proposer whose text some step read (layer.done's references and
    // every aggregator.step's): one set, so a reference used later is never "not used".
    this.used = new Set();
    // Per layer: the policy note and what it says, rewritten when a staircase reads on.
    this.notes = new Map();

    this.state = el("span", { class: "run-state", text: "running" });
    this.layersBox = el("div", { class: "layers" });
    this.answer = new Lane({ kind: "answer", title: "Answer", subtitle: "" });
    this.answer.text.setAttribute("data-role", "answer");
    this.answer.text.setAttribute("aria-label", `Answer of ${model}`);
    this.answer.setStatus("waiting", "waiting for the policy");
    this.error = el("p", { class: "error", role: "alert", hidden: true });
    this.timeline = el("figure", { class: "timeline", hidden: true });
    this.stats = el("dl", { class: "stats" });
    this.logList = el("ol", { class: "log-list" });
    this.logSummary = el("summary", { text: "Progress items (0)" });
    this.root = el(
      "section",
      { class: "run", "aria-label": `Run of ${model}`, "data-model": model },
      el(
        "header",
        { class: "run-head" },
        el("h2", {}, el("span", { class: "run-model", text: model }), this.state),
        description ? el("p", { class: "desc", text: description }) : null,
      ),
      this.layersBox,
      this.answer.root,
      this.error,
      this.stats,
      this.timeline,
      el("details", { class: "log" }, this.logSummary, this.logList),
    );
    this.setStats();
  }

  start() {
    this.t0 = performance.now();
  }

  layer(index) {
    let layer = this.layers.get(index);
    if (!layer) {
      const grid = el("div", { class: "lanes" });
      const title = index === 0 ? "Proposers" : `Layer ${index + 1}: proposers refine`;
      const section = el("section", { class: "layer", "data-layer": index }, el("h3", { text: title }), grid);
      this.layersBox.append(section);
      layer = { section, grid };
      this.layers.set(index, layer);
    }
    return layer;
  }

  lane(layer, index, agent) {
    const key = `${layer}:${index}`;
    let lane = this.lanes.get(key);
    if (!lane) {
      lane = new Lane({ kind: "proposer", title: agent, subtitle: "" });
      lane.root.dataset.layer = layer;
      lane.root.dataset.index = index;
      lane.root.dataset.agent = agent;
      // Keep lanes in proposer order, whatever order they started in.
      const grid = this.layer(layer).grid;
      const after = [...grid.children].find((n) => Number(n.dataset.index) > index);
      grid.insertBefore(lane.root, after || null);
      this.lanes.set(key, lane);
      this.byAgent.set(`${layer}:${agent}`, lane);
    }
    return lane;
  }

  layerLanes(layer) {
    return [...this.lanes.keys()].filter((key) => key.startsWith(`${layer}:`));
  }

  log(item) {
    this.items += 1;
    this.logSummary.textContent = `Progress items (${this.items})`;
    if (item.type === "proposer.text" || item.type === "proposer.tokens") return;
    const who = item.agent ? ` ${item.agent}` : item.layer !== undefined ? ` layer ${item.layer}` : "";
    const t = typeof item.t === "number" ? seconds(item.t) : "";
    this.logList.append(el("li", {}, el("span", { class: "t", text: t }), ` ${item.type}${who}`));
  }

  /** One progress item. Unknown types are logged and otherwise ignored. */
  progress(item) {
    this.log(item);
    const handler = this.handlers[item.type];
    if (!handler) return;
    try {
      handler.call(this, item);
    } catch (error) {
      // An item this page misreads must not end the run's display; it is a bug all the same.
      console.error(`moa-stream playground: could not show a ${item.type} item`, error);
    }
  }

  content(text) {
    const now = (performance.now() - this.t0) / 1000;
    this.chunkTimes.push(now);
    this.answerText += text;
    if (this.clientTtft === null) {
      this.clientTtft = now;
      this.answer.root.dataset.firstTokenAt = String(this.clientTtft);
      this.answer.setStatus("streaming");
      this.setStats();
    }
    this.answer.append(text);
  }

  fail(message) {
    this.error.hidden = false;
    this.error.textContent = message;
    if (this.answer.status !== "complete") this.answer.setStatus("failed");
    for (const lane of this.lanes.values()) {
      if (lane.status === "streaming" || lane.status === "waiting") lane.setStatus("cancelled");
    }
  }

  finish(outcome) {
    this.total = (performance.now() - this.t0) / 1000;
    this.root.dataset.outcome = outcome;
    this.state.textContent = outcome === "done" ? "done" : outcome;
    this.state.dataset.outcome = outcome;
    this.setStats();
    if (this.report) this.drawTimeline();
  }

  setStats() {
    const r = this.report;
    const rows = [
      ["TTFT (this browser)", seconds(this.clientTtft), "ttft"],
      ["TTFT (server)", seconds(r && r.ttft_s), "server-ttft"],
      ["Policy fired", seconds(r && r.time_to_quorum_s), "policy"],
      ["Total time", seconds(this.total), "total"],
    ];
    const answer = this.answerFigure();
    rows.push(["Answer tokens", answer ? `${answer.estimated ? "≈ " : ""}${answer.tokens}` : "–", "answer-tokens"]);
    const usage = this.usage || (r && r.usage);
    const approx = usage && usage.estimated ? "≈ " : "";
    rows.push([
      "Tokens, whole MoA",
      usage ? `${approx}${usage.prompt_tokens} in · ${approx}${usage.completion_tokens} out` : "–",
      "tokens",
    ]);
    const gap = longestGap(this.chunkTimes);
    rows.push(["Longest gap between answer chunks", seconds(gap), "longest-gap"]);
    rows.push(["Restarts", this.answerText ? String(countRestarts(this.answerText)) : "–", "restarts"]);
    rows.push(["Repeated sentences", this.answerText ? String(countLoops(this.answerText)) : "–", "loops"]);
    this.stats.replaceChildren(
      ...rows.map(([term, value, key]) =>
        el("div", { class: "stat", "data-stat": key }, el("dt", { text: term }), el("dd", { text: value })),
      ),
    );
  }

  /**
   * The answer's tokens: aggregator.done's figure, which counts every staircase step; from the
   * report (every request of the answering aggregator) if that item never came.
   */
  answerFigure() {
    if (this.answerTokens) return this.answerTokens;
    const r = this.report;
    if (!r || !r.aggregator) return null;
    const steps = r.agents.filter((a) => a.role === "aggregator" && a.agent === r.aggregator && a.status !== "failed");
    if (!steps.length) return null;
    return {
      tokens: steps.reduce((sum, a) => sum + a.usage.completion_tokens, 0),
      estimated: steps.some((a) => a.usage.estimated),
    };
  }

  /** Marks a reference some step read as used (a partial one as partial, with its cut). */
  useReference(layer, ref) {
    const key = `${layer}:${ref.index}`;
    const lane = this.lanes.get(key) || (ref.agent !== undefined ? this.byAgent.get(`${layer}:${ref.agent}`) : null);
    if (!lane) return;
    const read = ref.status === "complete" || ref.status === "partial";
    // A step that was shown a reference before any of its text arrived did not use it.
    if (!read || ref.chars === 0) return;
    this.used.add(`${layer}:${lane.root.dataset.index}`);
    lane.root.dataset.used = "yes";
  }

  /** The policy note of a layer, from its references and what still runs on after it. */
  writeNote(layer) {
    const note = this.notes.get(layer);
    const counts = {};
    for (const ref of note.refs) counts[ref.status] = (counts[ref.status] || 0) + 1;
    const tally = Object.entries(counts).map(([status, n]) => `${n} ${status}`);
    if (note.runningOn > 0) tally.push(`${note.runningOn} still running, read by later steps`);
    else if (note.unused > 0) tally.push(`${note.unused} not waited for`);
    note.marker.replaceChildren(
      el("strong", { text: `Policy fired at ${seconds(note.t)}` }),
      ` — ${note.why}. References: ${tally.join(", ") || "none"}.`,
      note.cut ? el("span", { class: "cut-note", text: ` ${CUTS[note.cut] || note.cut}.` }) : null,
    );
  }

  /** Where the run's timeline ends: its last request or its total time, whichever is later. */
  timelineEnd() {
    const r = this.report;
    return r ? Math.max(r.total_s, ...r.agents.map((a) => a.started_s + (a.duration_s || 0))) : 0;
  }

  /** The timeline from the run's report; `end` puts two runs on one scale in compare mode. */
  drawTimeline(end = this.timelineEnd() || 1) {
    const r = this.report;
    const pct = (s) => `${Math.min(100, Math.max(0, (s / end) * 100)).toFixed(2)}%`;
    // A proposer the aggregator read part of is drawn as partial, though its request was then
    // cancelled: what matters on the timeline is what its text was used for.
    const partial = new Set();
    for (const layer of r.layers) {
      for (const ref of layer.references) if (ref.status === "partial") partial.add(`${layer.layer}:${ref.index}`);
    }
    // So is one a later staircase step read before it was cancelled.
    for (const key of this.used) partial.add(key);
    const rows = r.agents.map((a) => {
      const key = `${a.layer}:${a.index}`;
      const status = a.role === "proposer" && a.status !== "complete" && partial.has(key) ? "partial" : a.status;
      const first = a.ttft_s === null ? null : a.started_s + a.ttft_s;
      const stop = a.duration_s === null ? r.total_s : a.started_s + a.duration_s;
      const track = el("div", { class: "track" });
      track.append(
        el("span", {
          class: "bar wait",
          style: { left: pct(a.started_s), width: pct((first === null ? stop : first) - a.started_s) },
        }),
      );
      if (first !== null) {
        track.append(el("span", { class: `bar seg ${a.role} ${status}`, style: { left: pct(first), width: pct(stop - first) } }));
      }
      const role = a.role === "aggregator" ? "aggregator" : `proposer${r.layers.length > 1 ? ` L${a.layer + 1}` : ""}`;
      const words =
        `${a.agent} (${role}): sent at ${seconds(a.started_s)}, first token ${seconds(first)}, ` +
        `ended ${seconds(stop)}, ${status}`;
      return el(
        "li",
        { class: "tl-row", title: words },
        el("span", { class: "tl-label", text: a.agent }),
        track,
        el("span", { class: "sr-only", text: words }),
      );
    });
    const lines = el("div", { class: "tl-lines", "aria-hidden": "true" });
    for (const layer of r.layers) {
      lines.append(el("span", { class: "tl-line policy", style: { left: pct(layer.decided_s) }, "data-label": "policy" }));
    }
    if (r.ttft_s !== null) {
      lines.append(el("span", { class: "tl-line ttft", style: { left: pct(r.ttft_s) }, "data-label": "first token" }));
    }
    for (const step of this.steps) {
      lines.append(el("span", { class: "tl-line step", style: { left: pct(step.t) }, "data-label": step.label }));
    }
    this.timeline.replaceChildren(
      el("figcaption", { text: `Timeline, 0 to ${seconds(end)}: grey is waiting for the first token, colour is streaming.` }),
      el("div", { class: "tl-body" }, el("ol", { class: "tl-rows" }, ...rows), lines),
    );
    this.timeline.hidden = false;
  }
}

// What each progress item does to the view (see docs/server.md for the fields).
RunView.prototype.handlers = {
  "proposer.started"(item) {
    this.lane(item.layer, item.index, item.agent).setStatus("streaming", "started");
  },
  "proposer.text"(item) {
    for (const [agent, text] of Object.entries(item.text || {})) {
      const lane = this.byAgent.get(`${item.layer}:${agent}`);
      if (!lane) continue;
      if (lane.status === "streaming" || lane.status === "waiting") lane.setStatus("streaming");
      lane.append(text);
    }
  },
  "proposer.tokens"(item) {
    for (const [agent, tokens] of Object.entries(item.tokens || {})) {
      const lane = this.byAgent.get(`${item.layer}:${agent}`);
      if (!lane) continue;
      lane.tokens = tokens;
      // Every lane still receiving text, partial references and those a staircase reads on
      // included, until its final figure arrives.
      if (!lane.final) lane.meta.textContent = `≈ ${plural(tokens, "token")} so far`;
    }
  },
  "proposer.done"(item) {
    const lane = this.lane(item.layer, item.index, item.agent);
    lane.setStatus("complete");
    lane.final = true;
    lane.meta.textContent = `${item.estimated ? "≈ " : ""}${plural(item.tokens, "token")} · first token ${seconds(item.ttft_s)} · done at ${seconds(item.t)}`;
  },
  "proposer.failed"(item) {
    const lane = this.lane(item.layer, item.index, item.agent);
    lane.setStatus("failed");
    lane.final = true;
    lane.meta.textContent = `failed at ${seconds(item.t)}: ${item.kind}`;
    lane.meta.title = item.error || "";
  },
  "layer.done"(item) {
    const layer = this.layer(item.layer);
    const refs = item.references || [];
    this.lastLayer = item.layer;
    for (const ref of refs) {
      const lane = this.lanes.get(`${item.layer}:${ref.index}`);
      if (lane && ref.status === "partial") {
        lane.setStatus("partial", "partial");
        lane.mark("cut", "used up to here", `The aggregator took ${ref.chars} characters of this answer`);
      }
    }
    for (const [key, lane] of this.lanes) {
      if (!key.startsWith(`${item.layer}:`)) continue;
      lane.root.dataset.used = "no";
      if (lane.status === "streaming" || lane.status === "waiting") {
        lane.setStatus("cancelled", "not waited for");
        lane.notWaited = true;
      }
    }
    for (const ref of refs) this.useReference(item.layer, ref);
    const marker = el("div", { class: "policy-marker", role: "note", "data-reason": item.reason, "data-layer": item.layer });
    this.notes.set(item.layer, {
      marker,
      refs,
      t: item.t,
      why: REASONS[item.reason] || item.reason,
      cut: item.cut,
      unused: this.layerLanes(item.layer).length - refs.length,
      runningOn: 0,
    });
    this.writeNote(item.layer);
    layer.section.append(marker);
  },
  "aggregator.started"(item) {
    this.answer.sub.textContent = ` · ${item.agent}${item.attempt ? ` (fallback ${item.attempt})` : ""}`;
    this.answer.setStatus("waiting", "aggregator started");
  },
  "aggregator.failed"(item) {
    this.answer.mark("fail", `${item.agent} failed`, `${item.agent} failed before answering (${item.kind}): ${item.error}`);
  },
  "aggregator.step"(item) {
    // Staircase steps: the shape may grow; show what is there and never depend on it.
    const n = Number.isInteger(item.step) ? item.step : (this.lastStep || 1) + 1;
    this.lastStep = n;
    const refs = Array.isArray(item.references)
      ? item.references.map((r) => `${r.agent}: ${r.status}${r.tokens !== undefined ? ` (${r.tokens} tokens)` : ""}`).join("; ")
      : "";
    const label = `step ${n}`;
    this.answer.mark("step", label, refs ? `${label} — ${refs}` : label);
    const layer = this.lastLayer;
    if (layer !== undefined && Array.isArray(item.references)) {
      // The staircase reads on: proposers layer.done left behind keep running for later steps.
      for (const ref of item.references) {
        const lane =
          (Number.isInteger(ref.index) && this.lanes.get(`${layer}:${ref.index}`)) || this.byAgent.get(`${layer}:${ref.agent}`);
        if (lane && lane.notWaited) {
          lane.notWaited = false;
          lane.setStatus("streaming");
        }
        if (lane && Number.isInteger(ref.index)) this.useReference(layer, ref);
        else if (lane) this.useReference(layer, { ...ref, index: Number(lane.root.dataset.index) });
      }
      const note = this.notes.get(layer);
      if (note) {
        note.runningOn = [...this.lanes.entries()].filter(
          ([key, lane]) => key.startsWith(`${layer}:`) && !note.refs.some((r) => `${layer}:${r.index}` === key) && !lane.notWaited,
        ).length;
        this.writeNote(layer);
      }
    }
    if (typeof item.t === "number") this.steps.push({ t: item.t, label });
  },
  "aggregator.done"(item) {
    this.answer.setStatus("complete");
    // The same figures as the tiles: every step's tokens, and the first token as this browser
    // saw it (the aggregator's own TTFT from its request would be a third, different figure).
    this.answerTokens = { tokens: item.tokens, estimated: Boolean(item.estimated) };
    this.answer.meta.textContent = `${item.estimated ? "≈ " : ""}${plural(item.tokens, "token")} · first token at ${seconds(this.clientTtft)}`;
    this.setStats();
  },
  "run.done"(item) {
    this.report = item.report;
    for (const agent of this.report.agents) {
      if (agent.role !== "proposer") continue;
      const lane = this.lanes.get(`${agent.layer}:${agent.index}`);
      if (!lane) continue;
      // The run's final word: a lane the policy did not wait for was cancelled, or went on (a
      // partial reference stays "partial": its text so far is what the aggregator read).
      const used = this.used.has(`${agent.layer}:${agent.index}`);
      lane.final = true;
      lane.notWaited = false;
      if (agent.status === "cancelled" && lane.status !== "partial") lane.setStatus(used ? "partial" : "cancelled", used ? "partial" : undefined);
      else if (agent.status === "complete" && lane.status !== "complete") lane.setStatus("complete");
      lane.root.dataset.used = used ? "yes" : "no";
      if (!used && agent.status === "complete") lane.badge.textContent += " · not used";
      if (agent.status !== "failed") {
        const ended = agent.duration_s === null ? null : agent.started_s + agent.duration_s;
        lane.meta.textContent =
          `${plural(agent.usage.completion_tokens, "token")} · first token ${seconds(agent.ttft_s)}` +
          ` · ${agent.status === "cancelled" ? "stopped" : "done"} at ${seconds(ended)}`;
      }
    }
    this.setStats();
  },
};

// -- the page ---------------------------------------------------------------------------------

const ui = {
  form: $("#run-form"),
  modelA: $("#model-a"),
  modelB: $("#model-b"),
  descA: $("#model-a-desc"),
  descB: $("#model-b-desc"),
  compare: $("#compare"),
  prompt: $("#prompt"),
  run: $("#run"),
  stop: $("#stop"),
  status: $("#status"),
  runs: $("#runs"),
  summary: $("#compare-summary"),
  keyForm: $("#key-form"),
  keyInput: $("#api-key"),
  keyError: $("#key-error"),
};

let models = [];
let controller = null;

function say(message) {
  ui.status.textContent = message;
}

function describe(select, desc) {
  const model = models.find((m) => m.id === select.value);
  desc.textContent = (model && model.description) || "";
}

function fillModels() {
  for (const select of [ui.modelA, ui.modelB]) {
    select.replaceChildren(...models.map((m) => el("option", { value: m.id, text: m.id })));
    select.disabled = models.length === 0;
  }
  const ids = models.map((m) => m.id);
  const first = PREFERRED.find((id) => ids.includes(id)) || ids[0];
  const second = PREFERRED.find((id) => ids.includes(id) && id !== first) || ids.find((id) => id !== first) || first;
  if (first) ui.modelA.value = first;
  if (second) ui.modelB.value = second;
  describe(ui.modelA, ui.descA);
  describe(ui.modelB, ui.descB);
  ui.run.disabled = models.length === 0;
}

function askForKey(message) {
  ui.keyForm.hidden = false;
  ui.keyError.textContent = message || "";
  ui.run.disabled = true;
  say("Enter an API key to continue.");
  ui.keyInput.focus();
}

async function loadModels() {
  try {
    models = await api.models();
  } catch (error) {
    if (error.status === 401) {
      askForKey(api.key ? "That key was refused." : "");
      return false;
    }
    say(`Could not list the models: ${error.message}`);
    return false;
  }
  ui.keyForm.hidden = true;
  fillModels();
  say(models.length ? `${plural(models.length, "model")} available.` : "The server has no models.");
  return true;
}

function setRunning(running) {
  ui.run.disabled = running || models.length === 0;
  ui.stop.disabled = !running;
  ui.form.setAttribute("aria-busy", running ? "true" : "false");
}

async function runOne(view, prompt, signal) {
  view.start();
  try {
    for await (const item of api.chat(view.model, prompt, signal)) {
      if (item.progress) view.progress(item.progress);
      else if (item.content) view.content(item.content);
      else if (item.usage) view.usage = item.usage;
      else if (item.error) {
        view.fail(item.error.message || "The run failed.");
        view.finish("failed");
        return view;
      }
    }
    view.finish("done");
  } catch (error) {
    if (error.name === "AbortError") {
      view.fail("Stopped: the server cancelled every request of the run.");
      view.finish("stopped");
    } else {
      if (!(error instanceof ApiError)) console.error("moa-stream playground:", error);
      view.fail(error.message);
      view.finish("failed");
      if (error.status === 401) askForKey("The server refused the key.");
    }
  }
  return view;
}

function compareSummary(a, b) {
  if (a.clientTtft === null || b.clientTtft === null) {
    return el("p", { text: "One of the runs gave no answer, so there is no TTFT to compare." });
  }
  const [fast, slow] = a.clientTtft <= b.clientTtft ? [a, b] : [b, a];
  const diff = slow.clientTtft - fast.clientTtft;
  const p = el("p", { "data-ttft-difference": diff.toFixed(3) });
  if (diff < 0.005) {
    p.append(`${a.model} and ${b.model} gave their first token at the same time (${seconds(a.clientTtft)}).`);
  } else {
    p.append(
      el("strong", { text: fast.model }),
      ` gave its first token ${seconds(diff)} sooner than `,
      el("strong", { text: slow.model }),
      ` (TTFT ${seconds(fast.clientTtft)} against ${seconds(slow.clientTtft)}, ` +
        `${Math.round((diff / slow.clientTtft) * 100)}% less waiting).`,
    );
  }
  return p;
}

async function run() {
  const prompt = ui.prompt.value.trim();
  if (!prompt) {
    say("Type a prompt first.");
    ui.prompt.focus();
    return;
  }
  const chosen = ui.compare.checked ? [ui.modelA.value, ui.modelB.value] : [ui.modelA.value];
  const views = chosen.map((id) => new RunView(id, (models.find((m) => m.id === id) || {}).description));
  ui.runs.replaceChildren(...views.map((v) => v.root));
  ui.runs.classList.toggle("compare", views.length > 1);
  ui.summary.hidden = true;
  controller = new AbortController();
  setRunning(true);
  say(views.length > 1 ? `Running ${chosen.join(" and ")}…` : `Running ${chosen[0]}…`);
  // Both requests leave together, so their TTFTs are measured from the same moment.
  await Promise.all(views.map((view) => runOne(view, prompt, controller.signal)));
  controller = null;
  setRunning(false);
  if (views.length > 1) {
    // One time scale for both timelines, so that their bars compare at a glance.
    const end = Math.max(...views.map((v) => v.timelineEnd()));
    for (const view of views) if (view.report && end > 0) view.drawTimeline(end);
    ui.summary.replaceChildren(el("h2", { text: "Compared" }), compareSummary(views[0], views[1]));
    ui.summary.hidden = false;
  }
  const done = views.filter((v) => v.root.dataset.outcome === "done");
  say(
    views
      .map((v) => `${v.model}: ${v.root.dataset.outcome}${v.clientTtft !== null ? `, TTFT ${seconds(v.clientTtft)}` : ""}`)
      .join("; ") + (done.length === views.length ? "." : ""),
  );
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (!controller) run();
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});
ui.stop.addEventListener("click", () => controller && controller.abort());
ui.compare.addEventListener("change", () => {
  ui.modelB.hidden = !ui.compare.checked;
  ui.descB.hidden = !ui.compare.checked;
  if (ui.compare.checked) ui.modelB.focus();
});
ui.modelA.addEventListener("change", () => describe(ui.modelA, ui.descA));
ui.modelB.addEventListener("change", () => describe(ui.modelB, ui.descB));
ui.keyForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  api.key = ui.keyInput.value.trim();
  if (await loadModels()) {
    sessionStorage.setItem(KEY_STORAGE, api.key);
    ui.keyInput.value = "";
    ui.prompt.focus();
  }
});

loadModels();
