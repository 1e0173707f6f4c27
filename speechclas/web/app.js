// The speechclas web page: sends a clip (file, URL or microphone) to the DEEPaaS
// predict endpoint of the server it came from and shows the answer, with the
// waveform and spectrogram of what was sent, computed here in the browser.
// Detection (predict with mode=detect): every keyword of a long file, marked on
// its waveform, or live from the microphone (Listen), sent in overlapping chunks.
// Train words: a training from text alone (text_only) through the train API, followed until it ends
// (its status by uuid, its phase and step from the metadata's "trainings"); its run can then answer
// every prediction of the page (the predict argument `run`).
"use strict";

const MODEL_URL = "/v2/models/speechclas/";
const PREDICT_URL = MODEL_URL + "predict/";
const TRAIN_URL = MODEL_URL + "train/";
const RECORD_SECONDS = 1.5;
// Listen: every LISTEN_EVERY_S a chunk of the newest audio, starting LISTEN_OVERLAP_S before the
// previous chunk ended. The overlap is longer than a 1 s window, so a keyword cut by one chunk's end
// is whole in the next one, past the smoothing's start (detect.py needs a few hops before it decides).
const LISTEN_EVERY_S = 1.0;
const LISTEN_OVERLAP_S = 1.5;
const LISTEN_KEEP_S = 30; // audio kept in the page, and the span of the timeline
const DEFAULT_SUPPRESSION_S = 1.5;
const DISPLAY_RATE = 16000; // the models' usual rate; the served run's rate replaces it
const $ = (id) => document.getElementById(id);

let served = { run: null, sampleRate: DISPLAY_RATE, windowMs: 30, strideMs: 10 };
let servedModel = null; // what GET /v2/models/speechclas/ said last (its "model")
// The run every prediction of the page names (a run trained here, chosen with "Listen with this model");
// null: none is named, and the API answers with the run it serves.
let chosen = null;

// --- talking to the API -------------------------------------------------------

function messageOf(body, response) {
  if (body && typeof body.message === "string") return body.message;
  if (body && typeof body === "object") {
    // webargs answers 422 as {"field": ["problem", ...]} (sometimes nested by location)
    const lines = [];
    const walk = (value, path) => {
      if (Array.isArray(value)) lines.push(`${path}: ${value.join(" ")}`);
      else if (value && typeof value === "object") for (const [k, v] of Object.entries(value)) walk(v, k);
    };
    walk(body, "");
    if (lines.length) return lines.join("\n");
  }
  return `${response.status} ${response.statusText}`;
}

async function callApi(url, options = {}) {
  const response = await fetch(url, { ...options, headers: { Accept: "application/json" } });
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON: use the status line */ }
  if (!response.ok) throw Object.assign(new Error(messageOf(body, response)), { status: response.status });
  return body;
}

function audioSettings(run, settings) {
  return {
    run,
    sampleRate: settings.sample_rate || DISPLAY_RATE,
    windowMs: settings.window_size_ms || 30,
    strideMs: settings.window_stride_ms || 10,
  };
}

async function loadServedModel() {
  try {
    const meta = await callApi(MODEL_URL);
    servedModel = meta.model ? { ...meta.model, about: `${meta.name} ${meta.version}` } : null;
  } catch (error) {
    if (!chosen) $("served").textContent = `The API did not answer: ${error.message}`;
    return;
  }
  showModelInUse();
}

function showModelInUse() {
  // The header: the run the page's predictions go to.
  const line = $("served");
  if (chosen) {
    served = audioSettings(chosen.run, chosen.settings || {});
    const back = Object.assign(document.createElement("button"), { type: "button", textContent: "Use the served run" });
    back.addEventListener("click", () => { chosen = null; showModelInUse(); });
    line.replaceChildren(`Predicting with run ${chosen.run}, trained on this page (${chosen.labels.length} labels: ` +
      `${chosen.labels.join(", ")}).`, back);
    line.dataset.run = chosen.run;
    return;
  }
  delete line.dataset.run;
  if (!servedModel || !servedModel.run) {
    line.textContent = servedModel && servedModel.error ? `The API cannot serve its run: ${servedModel.error}`
      : "No trained model yet: train one (Train words below, speechclas-train or the API) first.";
    return;
  }
  served = audioSettings(servedModel.run, servedModel.settings || {});
  line.textContent = `Serving run ${servedModel.run} (${servedModel.labels.length} labels: ` +
    `${servedModel.labels.join(", ")}) of ${servedModel.about}.`;
}

function withRun(form) {
  // A run chosen on the page answers; else the API's served one.
  if (chosen) form.set("run", chosen.run);
  return form;
}

// --- audio: decoding, wav encoding -----------------------------------------------

async function decodeMono(arrayBuffer, rate) {
  // decodeAudioData resamples to the context's rate; mix the channels down as the server does.
  const context = new OfflineAudioContext(1, 1, rate);
  const buffer = await context.decodeAudioData(arrayBuffer.slice(0));
  const mono = new Float32Array(buffer.length);
  for (let c = 0; c < buffer.numberOfChannels; c++) {
    const channel = buffer.getChannelData(c);
    for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / buffer.numberOfChannels;
  }
  return mono;
}

function encodeWav(samples, rate) {
  // 16-bit PCM mono RIFF/WAVE: a 44-byte header, then little-endian samples.
  const view = new DataView(new ArrayBuffer(44 + 2 * samples.length));
  const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * samples.length, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, 2 * rate, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * samples.length, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    view.setInt16(44 + 2 * i, Math.round(s < 0 ? s * 32768 : s * 32767), true);
  }
  return new Blob([view.buffer], { type: "audio/wav" });
}

// --- plots ------------------------------------------------------------------------

function fft(re, im) {
  // In place, iterative radix-2 (length a power of two).
  const n = re.length;
  for (let i = 1, j = 0; i < n; i++) {
    let bit = n >> 1;
    for (; j & bit; bit >>= 1) j ^= bit;
    j ^= bit;
    if (i < j) { [re[i], re[j]] = [re[j], re[i]]; [im[i], im[j]] = [im[j], im[i]]; }
  }
  for (let size = 2; size <= n; size <<= 1) {
    const angle = -2 * Math.PI / size;
    for (let start = 0; start < n; start += size) {
      for (let k = 0; k < size / 2; k++) {
        const wr = Math.cos(angle * k), wi = Math.sin(angle * k);
        const a = start + k, b = a + size / 2;
        const tr = re[b] * wr - im[b] * wi, ti = re[b] * wi + im[b] * wr;
        re[b] = re[a] - tr; im[b] = im[a] - ti; re[a] += tr; im[a] += ti;
      }
    }
  }
}

function spectrogram(samples, windowSize, stride) {
  // Hann-windowed frames, magnitude squared, as TF's AudioSpectrogram (which the model's MFCCs start from).
  let fftSize = 1;
  while (fftSize < windowSize) fftSize <<= 1;
  const frames = [];
  for (let start = 0; start + windowSize <= samples.length; start += stride) {
    const re = new Float64Array(fftSize), im = new Float64Array(fftSize);
    for (let i = 0; i < windowSize; i++) {
      re[i] = samples[start + i] * (0.5 - 0.5 * Math.cos(2 * Math.PI * i / windowSize));
    }
    fft(re, im);
    const power = new Float32Array(fftSize / 2 + 1);
    for (let k = 0; k < power.length; k++) power[k] = re[k] * re[k] + im[k] * im[k];
    frames.push(power);
  }
  return frames;
}

function drawWaveform(canvas, samples, rate, window) {
  const g = canvas.getContext("2d");
  const { width, height } = canvas;
  g.fillStyle = "#10131a"; g.fillRect(0, 0, width, height);
  if (window) {
    const seconds = samples.length / rate;
    g.fillStyle = "rgba(47, 111, 219, 0.35)";
    g.fillRect(width * window.start_s / seconds, 0, width * (window.end_s - window.start_s) / seconds, height);
  }
  drawEnvelope(g, samples, width, height);
}

function drawEnvelope(g, samples, width, height) {
  // Each pixel column: a line from the lowest to the highest sample it covers.
  g.strokeStyle = "#9fd3ff"; g.beginPath();
  const perPixel = Math.max(1, Math.floor(samples.length / width));
  for (let x = 0; x < width; x++) {
    let low = 0, high = 0;
    for (let i = x * perPixel; i < Math.min(samples.length, (x + 1) * perPixel); i++) {
      low = Math.min(low, samples[i]); high = Math.max(high, samples[i]);
    }
    g.moveTo(x + 0.5, height / 2 - high * height / 2);
    g.lineTo(x + 0.5, height / 2 - low * height / 2 + 1);
  }
  g.stroke();
}

const SPAN_COLORS = ["#f6c343", "#54d18a", "#ff7a8a", "#b48cff", "#4fd1e8", "#ff9f43"];

function labelColor(label) {
  // The same colour for a label everywhere on the page.
  let hash = 0;
  for (const c of label) hash = (hash * 31 + c.charCodeAt(0)) >>> 0;
  return SPAN_COLORS[hash % SPAN_COLORS.length];
}

function drawSpans(g, spans, fromS, toS, width, height) {
  // Detections as labelled spans over a time axis from fromS to toS seconds.
  const x = (t) => width * (t - fromS) / (toS - fromS);
  g.font = "bold 13px system-ui, sans-serif";
  g.textBaseline = "top";
  const rowEnds = []; // where the last label of each text row ends, so labels do not overlap
  for (const { label, start_s, end_s, score } of spans) {
    if (end_s < fromS || start_s > toS) continue;
    const colour = labelColor(label);
    g.globalAlpha = 0.28; g.fillStyle = colour;
    g.fillRect(x(start_s), 0, Math.max(2, x(end_s) - x(start_s)), height);
    g.globalAlpha = 1; g.fillRect(x(end_s) - 1, 0, 2, height);
    const text = `${label} ${(100 * score).toFixed(0)}%`, textWidth = g.measureText(text).width + 6;
    let row = rowEnds.findIndex((end) => end < x(start_s));
    if (row < 0) row = rowEnds.length;
    rowEnds[row] = x(start_s) + 2 + textWidth;
    const top = 3 + 19 * row;
    g.fillStyle = "#10131a"; g.fillRect(x(start_s) + 2, top, textWidth, 17);
    g.fillStyle = colour; g.fillText(text, x(start_s) + 5, top + 2);
  }
}

function drawTimeAxis(g, fromS, toS, width, height) {
  // A tick and its time every few seconds along the bottom.
  const step = toS - fromS > 120 ? 30 : toS - fromS > 40 ? 10 : toS - fromS > 8 ? 2 : 0.5;
  g.fillStyle = "#8892a6"; g.font = "11px system-ui, sans-serif"; g.textBaseline = "bottom";
  for (let t = Math.ceil(fromS / step) * step; t <= toS; t += step) {
    const at = width * (t - fromS) / (toS - fromS);
    g.fillRect(at, height - 4, 1, 4);
    g.fillText(`${Number(t.toFixed(1))} s`, at + 2, height - 2);
  }
}

function color(value) {
  // Dark blue through magenta to yellow, value in [0, 1].
  const r = Math.round(255 * Math.min(1, 1.6 * value));
  const gr = Math.round(255 * Math.max(0, 1.8 * value - 0.8));
  const b = Math.round(255 * Math.max(0, Math.sin(Math.PI * Math.min(1, value * 1.3))) * 0.8 + 30);
  return [r, gr, b];
}

function drawSpectrogram(canvas, frames) {
  const g = canvas.getContext("2d");
  const { width, height } = canvas;
  g.fillStyle = "#10131a"; g.fillRect(0, 0, width, height);
  if (!frames.length) return;
  const bins = frames[0].length;
  const logs = frames.map((f) => Array.from(f, (p) => Math.log10(p + 1e-10)));
  const top = Math.max(...logs.map((f) => Math.max(...f)));
  const floor = top - 8; // 80 dB of range
  const image = g.createImageData(width, height);
  for (let x = 0; x < width; x++) {
    const frame = logs[Math.min(frames.length - 1, Math.floor(x * frames.length / width))];
    for (let y = 0; y < height; y++) {
      const bin = Math.min(bins - 1, Math.floor((height - 1 - y) * bins / height));
      const [r, gr, b] = color(Math.max(0, (frame[bin] - floor) / (top - floor)));
      const at = 4 * (y * width + x);
      image.data[at] = r; image.data[at + 1] = gr; image.data[at + 2] = b; image.data[at + 3] = 255;
    }
  }
  g.putImageData(image, 0, 0);
}

// --- showing an answer -----------------------------------------------------------------

function showBusy(busy) {
  $("busy").hidden = !busy;
  for (const id of ["url-button", "record-button", "file-input", "detect-file-input"]) $(id).disabled = busy;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function showBars(predictions) {
  const list = $("bars");
  list.replaceChildren();
  for (const { label, probability } of predictions) {
    const row = document.createElement("li");
    row.className = "bar-row";
    row.dataset.label = label;
    const name = Object.assign(document.createElement("span"), { className: "bar-label", textContent: label });
    const track = Object.assign(document.createElement("span"), { className: "bar-track" });
    const fill = Object.assign(document.createElement("span"), { className: "bar-fill" });
    fill.style.display = "block";
    fill.style.width = `${(100 * probability).toFixed(1)}%`;
    track.append(fill);
    const value = Object.assign(document.createElement("span"), {
      className: "bar-value", textContent: `${(100 * probability).toFixed(1)} %`,
    });
    row.append(name, track, value);
    list.append(row);
  }
}

async function showAudio(audioBytes, window) {
  const note = $("plot-note");
  if (!audioBytes) return;
  try {
    const rate = served.sampleRate;
    const samples = await decodeMono(audioBytes, rate);
    drawWaveform($("waveform"), samples, rate, window);
    const windowSize = Math.round(rate * served.windowMs / 1000), stride = Math.round(rate * served.strideMs / 1000);
    drawSpectrogram($("spectrogram"), spectrogram(samples, windowSize, stride));
    $("spectrogram-caption").textContent =
      `Spectrogram (log power, ${served.windowMs} ms windows every ${served.strideMs} ms, 0–${rate / 2} Hz)`;
    const player = $("player");
    player.src = URL.createObjectURL(new Blob([audioBytes]));
    player.hidden = false;
    note.hidden = true;
  } catch (error) {
    note.textContent = `This browser could not decode the audio to draw it (${error.message}); the server could.`;
    note.hidden = false;
  }
}

async function classify(form, sourceText, audioBytes) {
  showError("");
  showBusy(true);
  try {
    const answer = await callApi(PREDICT_URL, { method: "POST", body: withRun(form) });
    $("result-source").textContent = `of ${sourceText}`;
    $("result-run").textContent = `Answered by run ${answer.run}`;
    $("result-run").dataset.run = answer.run;
    showBars(answer.predictions);
    const w = answer.window;
    $("result-details").textContent =
      `${answer.duration_s} s, ${answer.sample_rate} Hz, ${answer.channels} channel(s); ` +
      `scored ${w.start_s}–${w.end_s} s (${w.selection})`;
    $("player").hidden = true;
    $("plot-note").hidden = true;
    for (const id of ["waveform", "spectrogram"]) {
      const canvas = $(id);
      canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    }
    $("result").hidden = false;
    if (!audioBytes) {
      $("plot-note").textContent =
        "The server downloaded this URL; the browser may not (other sites rarely allow it), so nothing is drawn.";
      $("plot-note").hidden = false;
    }
    await showAudio(audioBytes, w);
    document.body.dataset.state = "done";
  } catch (error) {
    showError(error.message);
    document.body.dataset.state = "error";
  } finally {
    showBusy(false);
  }
}

// --- the three inputs ------------------------------------------------------------------

$("file-input").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  const form = new FormData();
  form.append("data", file, file.name);
  await classify(form, file.name, await file.arrayBuffer());
  event.target.value = "";
});

$("url-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const url = $("url-input").value.trim();
  const form = new FormData();
  form.append("urls", url);
  let bytes = null;
  try { // drawn only if the other site lets this page read it (CORS)
    const response = await fetch(url);
    if (response.ok) bytes = await response.arrayBuffer();
  } catch (_) { /* cross-origin or unreachable from the browser: the server may still reach it */ }
  await classify(form, url, bytes);
});

async function record(seconds) {
  // The browser's voice-call processing (gain control above all) would change the clip the model scores.
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { autoGainControl: false, echoCancellation: false, noiseSuppression: false, channelCount: 1 },
  });
  try {
    const recorder = new MediaRecorder(stream);
    const chunks = [];
    recorder.addEventListener("dataavailable", (event) => chunks.push(event.data));
    const stopped = new Promise((resolve) => recorder.addEventListener("stop", resolve));
    recorder.start();
    await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
    recorder.stop();
    await stopped;
    return new Blob(chunks, { type: recorder.mimeType });
  } finally {
    stream.getTracks().forEach((track) => track.stop());
  }
}

$("record-button").addEventListener("click", async () => {
  const button = $("record-button"), status = $("record-status");
  showError("");
  button.disabled = true;
  button.classList.add("recording");
  status.textContent = "Recording… say a word";
  try {
    const compressed = await record(RECORD_SECONDS);
    // MediaRecorder gives compressed audio; decode it and send plain 16-bit PCM wav.
    const samples = await decodeMono(await compressed.arrayBuffer(), served.sampleRate);
    const wav = encodeWav(samples, served.sampleRate);
    status.textContent = `Recorded ${(samples.length / served.sampleRate).toFixed(2)} s`;
    const form = new FormData();
    form.append("data", wav, "recording.wav");
    await classify(form, "the microphone", await wav.arrayBuffer());
  } catch (error) {
    status.textContent = "Recording failed";
    showError(`Could not record from the microphone: ${error.message}`);
    document.body.dataset.state = "error";
  } finally {
    button.disabled = false;
    button.classList.remove("recording");
  }
});

// --- detection: a file, the microphone ---------------------------------------------------

function detectForm(audio, fileName) {
  // predict with mode=detect; the threshold only if one is typed in (else the run's own).
  const form = new FormData();
  form.append("data", audio, fileName);
  form.append("mode", "detect");
  const threshold = $("detect-threshold").value.trim();
  if (threshold !== "") form.append("threshold", threshold);
  return withRun(form);
}

function detectionRow(cells, detection) {
  const row = document.createElement("tr");
  row.className = "detection-row";
  row.dataset.label = detection.label;
  row.dataset.start = detection.start_s;
  row.dataset.end = detection.end_s;
  row.dataset.score = detection.score;
  for (const text of cells) row.append(Object.assign(document.createElement("td"), { textContent: text }));
  row.children[1].style.borderLeft = `6px solid ${labelColor(detection.label)}`;
  return row;
}

$("detect-file-input").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  showError("");
  showBusy(true);
  $("busy").textContent = `Detecting keywords in ${file.name}…`;
  delete document.body.dataset.state;
  try {
    const answer = await callApi(PREDICT_URL, { method: "POST", body: detectForm(file, file.name) });
    const found = answer.detections;
    $("detect-source").textContent = `in ${file.name}`;
    $("detect-summary").textContent =
      `${found.length} keyword(s) in ${answer.duration_s} s, found by run ${answer.run} ` +
      `(threshold ${answer.settings.threshold}, a window every ${answer.settings.hop_ms} ms)`;
    $("detect-summary").dataset.run = answer.run;
    $("detect-table").tBodies[0].replaceChildren(...found.map((d, i) => detectionRow(
      [i + 1, d.label, d.start_s.toFixed(2), d.end_s.toFixed(2), `${(100 * d.score).toFixed(1)} %`], d)));
    $("detect-result").hidden = false;
    const canvas = $("detect-waveform"), note = $("detect-note");
    try {
      const samples = await decodeMono(await file.arrayBuffer(), served.sampleRate);
      const g = canvas.getContext("2d");
      drawWaveform(canvas, samples, served.sampleRate, null);
      const seconds = samples.length / served.sampleRate;
      drawSpans(g, found, 0, seconds, canvas.width, canvas.height);
      drawTimeAxis(g, 0, seconds, canvas.width, canvas.height);
      note.hidden = true;
    } catch (error) {
      note.textContent = `This browser could not decode the audio to draw it (${error.message}); the server could.`;
      note.hidden = false;
    }
    document.body.dataset.state = "done";
  } catch (error) {
    showError(error.message);
    document.body.dataset.state = "error";
  } finally {
    showBusy(false);
    $("busy").textContent = "Classifying…";
    event.target.value = "";
  }
});

class Listener {
  // The microphone as raw samples at the model's rate, the newest LISTEN_KEEP_S kept; one chunk in flight
  // at a time, so a slow server makes the chunks longer, never drops audio.
  constructor(rate) {
    this.rate = rate;
    this.blocks = []; // Float32Arrays, oldest first
    this.keptFrom = 0; // stream sample of blocks[0][0]
    this.received = 0; // samples since listening started
    this.sentUpTo = 0; // end of the last chunk sent
    this.detections = []; // in session time, deduplicated
    this.running = false;
  }

  async start() {
    // Browser voice processing off, as for recording: it would change what the model hears.
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { autoGainControl: false, echoCancellation: false, noiseSuppression: false, channelCount: 1 },
    });
    this.context = new AudioContext({ sampleRate: this.rate });
    const source = this.context.createMediaStreamSource(this.stream);
    // A ScriptProcessor hands over raw blocks without a separate worklet file; it must reach the
    // destination to run, through a muted gain so nothing is played back.
    this.processor = this.context.createScriptProcessor(4096, 1, 1);
    this.processor.onaudioprocess = (event) => this.receive(event.inputBuffer.getChannelData(0));
    const mute = this.context.createGain();
    mute.gain.value = 0;
    source.connect(this.processor).connect(mute).connect(this.context.destination);
    this.running = true;
    this.loop = this.sendChunks();
  }

  receive(samples) {
    this.blocks.push(new Float32Array(samples));
    this.received += samples.length;
    while (this.blocks.length && this.received - this.keptFrom - this.blocks[0].length > LISTEN_KEEP_S * this.rate) {
      this.keptFrom += this.blocks.shift().length;
    }
    if (!this.drawPending) {
      this.drawPending = true;
      requestAnimationFrame(() => { this.drawPending = false; this.draw(); });
    }
  }

  samples(from, to) {
    // The stream's samples [from, to) still kept.
    const out = new Float32Array(to - from);
    let at = this.keptFrom;
    for (const block of this.blocks) {
      const lo = Math.max(from, at), hi = Math.min(to, at + block.length);
      if (lo < hi) out.set(block.subarray(lo - at, hi - at), lo - from);
      at += block.length;
    }
    return out;
  }

  async sendChunks() {
    const every = Math.round(LISTEN_EVERY_S * this.rate), overlap = Math.round(LISTEN_OVERLAP_S * this.rate);
    while (this.running) {
      if (this.received - this.sentUpTo < every) {
        await new Promise((resolve) => setTimeout(resolve, 100));
        continue;
      }
      const end = this.received, start = Math.max(this.keptFrom, this.sentUpTo - overlap, 0);
      this.sentUpTo = end;
      try {
        const wav = encodeWav(this.samples(start, end), this.rate);
        const answer = await callApi(PREDICT_URL, { method: "POST", body: detectForm(wav, "listen.wav") });
        this.add(answer, start / this.rate);
        this.chunks = (this.chunks || 0) + 1;
        $("listen-status").textContent = `Listening: ${this.chunks} chunk(s) searched by run ${answer.run}.`;
        showError("");
      } catch (error) {
        if (this.running) showError(`Listening: ${error.message}`);
      }
    }
  }

  add(answer, offsetS) {
    // A keyword in two overlapping chunks is one: the same label within the suppression window. Of the
    // two, the one with more audio before it in its chunk is kept: a chunk that starts in the middle of a
    // word has no quiet before it to average with, and fires at another time than the whole stream would.
    const suppressionS = (answer.settings.suppression_ms ?? 1000 * DEFAULT_SUPPRESSION_S) / 1000;
    for (const d of answer.detections) {
      const found = {
        label: d.label, start_s: offsetS + d.start_s, end_s: offsetS + d.end_s, score: d.score,
        leadS: offsetS === 0 ? Infinity : d.start_s, // the session's first chunk starts where the stream does
      };
      const same = this.detections.find((o) => o.label === found.label && Math.abs(o.end_s - found.end_s) <= suppressionS);
      if (!same) this.detections.push(found);
      else if (found.leadS > same.leadS) Object.assign(same, found);
    }
    this.detections.sort((a, b) => a.end_s - b.end_s);
    this.showList();
    this.draw();
  }

  showList() {
    $("listen-detections").replaceChildren(...this.detections.map((d) => {
      const item = document.createElement("li");
      item.className = "detection";
      Object.assign(item.dataset, { label: d.label, start: d.start_s, end: d.end_s, score: d.score });
      const name = Object.assign(document.createElement("span"), { className: "detection-label", textContent: d.label });
      name.style.color = labelColor(d.label);
      const when = Object.assign(document.createElement("span"), {
        className: "detection-time", textContent: `at ${d.end_s.toFixed(2)} s`,
      });
      const score = Object.assign(document.createElement("span"), {
        className: "detection-score", textContent: `${(100 * d.score).toFixed(1)} %`,
      });
      item.append(name, when, score);
      return item;
    }));
  }

  draw() {
    const canvas = $("listen-timeline"), g = canvas.getContext("2d");
    const { width, height } = canvas;
    const nowS = this.received / this.rate, fromS = Math.max(0, nowS - LISTEN_KEEP_S), toS = fromS + LISTEN_KEEP_S;
    g.fillStyle = "#10131a"; g.fillRect(0, 0, width, height);
    const shown = this.samples(Math.round(fromS * this.rate), this.received);
    const drawnWidth = Math.round(width * (nowS - fromS) / LISTEN_KEEP_S);
    if (drawnWidth > 0) drawEnvelope(g, shown, drawnWidth, height);
    drawSpans(g, this.detections, fromS, toS, width, height);
    drawTimeAxis(g, fromS, toS, width, height);
    $("listen-clock").textContent = `${nowS.toFixed(1)} s`;
  }

  async stop() {
    this.running = false;
    this.stream?.getTracks().forEach((track) => track.stop());
    await this.context?.close();
    await this.loop; // the chunk in flight is still shown
  }
}

let listener = null;

async function startListening() {
  showError("");
  $("listen-button").hidden = true;
  $("listen-stop").hidden = false;
  delete document.body.dataset.listening;
  listener = new Listener(served.sampleRate);
  $("listen-detections").replaceChildren();
  $("listen-result").hidden = false;
  try {
    await listener.start();
    $("listen-status").textContent = "Listening… say some keywords";
    document.body.dataset.listening = "on";
  } catch (error) {
    await listener.stop();
    listener = null;
    $("listen-button").hidden = false;
    $("listen-stop").hidden = true;
    $("listen-status").textContent = "Could not listen";
    showError(`Could not listen to the microphone: ${error.message}`);
  }
}

async function stopListening() {
  $("listen-stop").disabled = true;
  await listener?.stop();
  $("listen-status").textContent =
    `Stopped after ${(listener.received / listener.rate).toFixed(1)} s: ${listener.detections.length} keyword(s).`;
  $("listen-stop").disabled = false;
  $("listen-stop").hidden = true;
  $("listen-button").hidden = false;
  document.body.dataset.listening = "stopped";
}

$("listen-button").addEventListener("click", startListening);
$("listen-stop").addEventListener("click", stopListening);

// --- Train words: a training from text alone, followed to its end ---------------------------

const TRAIN_POLL_MS = 1000;
// A training of the metadata is the one followed when it has its words and started after the page asked for
// it (its elapsed_s no longer than the page's own count, give or take this many seconds of latency).
const TRAIN_MATCH_SLACK_S = 5;
// The panel's quick settings; "Other training arguments" may replace any of them.
const TRAIN_DEFAULTS = { model_architecture: "tc_resnet8", preprocess: "logmel" };
const TRAIN_SAVED = "speechclas-training"; // sessionStorage: the training followed, found again after a reload
const MAX_TOP_K = 100; // the predict API's bound of top_k

let training = null; // the training followed: { uuid, since (ms, Date.now()), cancelling, progress }
let trained = null; // the run it made: { run, labels, settings }

function parseWords(text) {
  // "lights, music pause" -> ["lights", "music", "pause"]: commas or spaces, each word once, lower case.
  return [...new Set(text.split(/[\s,]+/).map((word) => word.toLowerCase()).filter(Boolean))];
}

function parseArguments(text) {
  // "unknown_word_clips=20 streaming_minutes=0" (or joined by &) -> [[name, value], ...]
  return text.split(/[\s&]+/).filter(Boolean).map((piece) => {
    const at = piece.indexOf("=");
    if (at <= 0) throw new Error(`Other training arguments: '${piece}' is not name=value`);
    return [piece.slice(0, at), piece.slice(at + 1)];
  });
}

function trainingQuery() {
  // The train API's query arguments (lists comma-separated), checked by the API, which names any it refuses.
  const words = parseWords($("train-words").value);
  if (!words.length) throw new Error("Type the keywords to train, e.g. lights, music, pause");
  const engines = Array.from(document.querySelectorAll("input[name=train-engine]:checked"), (box) => box.value);
  if (!engines.length) throw new Error("Choose at least one voice (speech synthesis engine) to say the words");
  const args = new Map([
    ["wanted_words", words.join(",")],
    ["text_only", "true"],
    ["synthetic_voices", engines.join(",")],
    ["synthetic_speakers", $("train-speakers").value.trim()],
    ["how_many_training_steps", $("train-steps").value.trim()],
    ["learning_rate", $("train-learning-rate").value.trim()],
    ...Object.entries(TRAIN_DEFAULTS),
  ]);
  for (const [name, value] of parseArguments($("train-extra").value)) args.set(name, value);
  return new URLSearchParams([...args].filter(([, value]) => value !== "")); // empty: the API's default
}

function showTrainError(message) {
  $("train-error").textContent = message;
  $("train-error").hidden = !message;
}

function clock(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function totalSteps(args) {
  // how_many_training_steps as the API echoes it: a list of stages (a number or a string when sent raw).
  const steps = args && args.how_many_training_steps;
  const stages = Array.isArray(steps) ? steps : String(steps ?? "").split(",");
  const total = stages.reduce((sum, n) => sum + Number(n), 0);
  return Number.isFinite(total) && total > 0 ? total : null;
}

async function runningTrainings() {
  // The metadata's "trainings" (phase and step of each API training of the server); null if it did not answer
  // or has none (an older speechclas).
  try {
    const meta = await callApi(MODEL_URL);
    return Array.isArray(meta.trainings) ? meta.trainings : null;
  } catch (_) {
    return null;
  }
}

function progressOf(trainings, args, followed) {
  // The followed training among the metadata's: the API does not tell a training its uuid, so the one with
  // its words that started after the page asked for it, the earliest such.
  const words = JSON.stringify(args && args.wanted_words);
  const ours = (Date.now() - followed.since) / 1000 + TRAIN_MATCH_SLACK_S;
  const candidates = trainings.filter((t) => JSON.stringify(t.wanted_words) === words && t.elapsed_s <= ours);
  return candidates.reduce((best, t) => (!best || t.elapsed_s > best.elapsed_s ? t : best), null);
}

function showProgress(args, progress, listed, cancelling) {
  // The status line (a live region: it changes with the phase only), the step and the bar. `listed`: the
  // metadata lists the server's trainings, so one not (yet) there waits for a worker to take it.
  const bar = $("train-bar");
  const total = (progress && progress.total) || totalSteps(args);
  let phase = listed ? "waiting for a worker…" : "running…";
  let step = total ? `${total} steps` : "";
  bar.removeAttribute("value"); // indeterminate
  if (progress && progress.phase === "preparing") {
    phase = args && args.text_only ? "saying the words…" : "preparing the data…";
    step = total ? `${total} steps to go` : "";
  } else if (progress && progress.phase === "training") {
    phase = "learning from the clips…";
    step = `step ${progress.step} of ${progress.total}`;
    bar.max = progress.total;
    bar.value = progress.step;
  } else if (progress && progress.phase === "evaluating") {
    phase = "evaluating and exporting…";
    step = `all ${progress.total} steps done`;
    bar.max = progress.total;
    bar.value = progress.total;
  }
  if (cancelling) phase = "cancelling…";
  const text = `Training ${describe(args)}: ${phase}`;
  if ($("train-status").textContent !== text) $("train-status").textContent = text;
  if ($("train-step").textContent !== step) $("train-step").textContent = step;
  document.body.dataset.trainingPhase = (progress && progress.phase) || "waiting";
}

function describe(args) {
  const words = args && args.wanted_words;
  return Array.isArray(words) ? words.join(", ") : String(words ?? "");
}

function setTraining(state) {
  document.body.dataset.training = state;
  const running = state === "running";
  $("train-button").disabled = running;
  $("train-cancel").hidden = !running;
  $("train-bar").hidden = !running;
  if (!running) {
    $("train-step").textContent = "";
    delete document.body.dataset.trainingPhase;
  }
}

function follow(uuid, since) {
  training = { uuid, since, cancelling: false, progress: null };
  sessionStorage.setItem(TRAIN_SAVED, JSON.stringify({ uuid, since }));
  $("train-done").hidden = true;
  $("train-progress").hidden = false;
  $("train-status").textContent = "Training started…";
  $("train-step").textContent = "";
  $("train-elapsed").textContent = "";
  $("train-bar").removeAttribute("value");
  setTraining("running");
  poll();
}

function stopFollowing(state) {
  training = null;
  sessionStorage.removeItem(TRAIN_SAVED);
  setTraining(state);
}

async function poll() {
  // GET of the training by its uuid, every TRAIN_POLL_MS until it is no longer running.
  const followed = training;
  if (!followed) return;
  let status;
  try {
    status = await callApi(TRAIN_URL + encodeURIComponent(followed.uuid));
  } catch (error) {
    if (training !== followed) return;
    if (error.status === 404) { // DEEPaaS forgets a cancelled training, and all of them when it restarts
      stopFollowing(followed.cancelling ? "cancelled" : "error");
      $("train-status").textContent = followed.cancelling ? "Cancelled." : "";
      if (!followed.cancelling) showTrainError("The API no longer knows this training (cancelled elsewhere, or restarted).");
      return;
    }
    $("train-status").textContent = `Asking for the training's status: ${error.message}; asking again…`;
    setTimeout(poll, 3 * TRAIN_POLL_MS);
    return;
  }
  if (training !== followed) return;
  $("train-elapsed").textContent = `${clock((Date.now() - followed.since) / 1000)} elapsed`;
  if (status.status === "running") {
    // The status tells running, not how far: the phase and step come from the metadata's trainings. One no
    // longer listed there is ending (or the metadata did not answer): its last known progress stays.
    const trainings = await runningTrainings();
    if (training !== followed) return;
    const progress = trainings && progressOf(trainings, status.args, followed);
    if (progress) followed.progress = progress;
    showProgress(status.args, followed.progress, trainings !== null, followed.cancelling);
    setTimeout(poll, TRAIN_POLL_MS);
  } else if (status.status === "done") {
    await finished(status);
  } else {
    stopFollowing(status.status === "cancelled" ? "cancelled" : "error");
    showTrainError(status.status === "cancelled" ? "" : `The training failed: ${status.message || status.status}`);
    $("train-status").textContent = status.status === "cancelled" ? "Cancelled." : "";
  }
}

function percent(value) {
  return typeof value === "number" ? `${(100 * value).toFixed(1)} %` : "–";
}

async function finished(status) {
  const output = (status.result && status.result.output) || status.result || {};
  const run = output.run;
  stopFollowing("labels"); // done, its labels not yet known
  $("train-status").textContent = `Done: ${describe(status.args)}.`;
  if (!run) {
    stopFollowing("error");
    showTrainError("The training ended without a run (a worker of a multi-machine training?)");
    return;
  }
  $("train-summary").textContent = `Run ${run} of ${describe(status.args)}: ${output.steps} steps in ` +
    `${status.result.duration ? status.result.duration.replace(/\.\d+$/, "") : `${output.duration_s} s`}; accuracy on speakers it never heard: validation ` +
    `${percent(output.validation_accuracy)}, test ${percent(output.test_accuracy)}.`;
  $("train-summary").dataset.run = run;
  $("train-labels").replaceChildren();
  $("train-done").hidden = false;
  $("train-use").disabled = true;
  try {
    trained = { run, ...(await runLabels(run, status.args && status.args.wanted_words, output.labels)) };
    $("train-labels").replaceChildren(...trained.labels.map((label) => Object.assign(
      document.createElement("span"), { className: "train-label", textContent: label })));
    $("train-use").disabled = false;
    setTraining("done");
  } catch (error) {
    showTrainError(`The run is trained, but its labels could not be read: ${error.message}`);
    setTraining("error");
  }
  loadServedModel(); // a new run is served at once, unless the operator pinned one
}

async function runLabels(run, words, known) {
  // The labels the training's result names (`known`), with the audio settings of the metadata when the new run
  // is the served one (the newest finished run, unless one is pinned); its labels too for an API without them.
  let meta = null;
  try {
    meta = await callApi(MODEL_URL);
  } catch (error) {
    if (!Array.isArray(known)) throw error;
  }
  const servedHere = meta && meta.model && meta.model.run === run;
  if (Array.isArray(known)) return { labels: known, settings: servedHere ? meta.model.settings || {} : null };
  if (servedHere) return { labels: meta.model.labels, settings: meta.model.settings || {} };
  // Else the run scores a moment of silence with every label in the answer (top_k), put in the model's order:
  // _silence_, _unknown_, then the words as trained.
  const form = new FormData();
  form.append("data", encodeWav(new Float32Array(DISPLAY_RATE), DISPLAY_RATE), "silence.wav");
  form.append("run", run);
  form.append("top_k", String(MAX_TOP_K));
  const answer = await callApi(PREDICT_URL, { method: "POST", body: form });
  const order = ["_silence_", "_unknown_", ...(Array.isArray(words) ? words : [])];
  const rank = (label) => (order.includes(label) ? order.indexOf(label) : order.length);
  const labels = answer.predictions.map((p) => p.label).sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  return { labels, settings: null };
}

$("train-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showTrainError("");
  let query;
  try {
    query = trainingQuery();
  } catch (error) {
    showTrainError(error.message);
    return;
  }
  $("train-button").disabled = true;
  $("train-done").hidden = true;
  delete document.body.dataset.training;
  const since = Date.now();
  try {
    const started = await callApi(`${TRAIN_URL}?${query}`, { method: "POST" });
    follow(started.uuid, since);
  } catch (error) { // a refused argument: the API's 422 names it
    showTrainError(error.message);
    setTraining("error");
  }
});

$("train-cancel").addEventListener("click", async () => {
  const followed = training;
  if (!followed || followed.cancelling) return;
  followed.cancelling = true;
  $("train-cancel").disabled = true;
  try {
    await callApi(TRAIN_URL + encodeURIComponent(followed.uuid), { method: "DELETE" });
  } catch (_) {
    // DEEPaaS 2.6 answers a cancel with a 500 after it has cancelled (README, Train through the API); the
    // next poll tells: a cancelled training is forgotten (404).
  } finally {
    $("train-cancel").disabled = false;
  }
});

$("train-use").addEventListener("click", async () => {
  // Every prediction of the page now names this run; Listen (re)starts with it.
  if (!trained) return;
  const rate = served.sampleRate;
  chosen = trained;
  showModelInUse();
  const listening = listener && listener.running;
  if (listening && rate !== served.sampleRate) await stopListening();
  if (!listener || !listener.running) await startListening();
  $("listen-button").closest(".card").scrollIntoView({ block: "nearest" });
});

function resumeTraining() {
  // The training this tab followed before a reload, if the API still knows it.
  try {
    const saved = JSON.parse(sessionStorage.getItem(TRAIN_SAVED) || "null");
    if (saved && saved.uuid) follow(saved.uuid, Number(saved.since) || Date.now());
  } catch (_) {
    sessionStorage.removeItem(TRAIN_SAVED);
  }
}

$("record-seconds").textContent = RECORD_SECONDS;
loadServedModel();
resumeTraining();
