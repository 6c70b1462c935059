// The chat page: streams /v1/chat/completions over fetch + SSE. Model text is only ever set as textContent.
"use strict";

const SETTINGS_KEY = "dots-serve.settings";
const SETTING_IDS = ["model", "system-prompt", "temperature", "max-tokens"]; // kept in localStorage
const API_KEY_KEY = "dots-serve.api-key"; // kept in sessionStorage only: gone when the tab closes

const elements = {
  conversation: document.getElementById("conversation"),
  emptyHint: document.getElementById("empty-hint"),
  composer: document.getElementById("composer"),
  message: document.getElementById("message"),
  send: document.getElementById("send"),
  stop: document.getElementById("stop"),
  newChat: document.getElementById("new-chat"),
  toggleSettings: document.getElementById("toggle-settings"),
  settings: document.getElementById("settings"),
  model: document.getElementById("model"),
  systemPrompt: document.getElementById("system-prompt"),
  temperature: document.getElementById("temperature"),
  maxTokens: document.getElementById("max-tokens"),
  apiKey: document.getElementById("api-key"),
  status: document.getElementById("server-status"),
};

let history = []; // [{role, content}] of completed turns, sent with every request
let activeStream = null; // {controller, conversation} while a reply streams
let conversation = 0; // counts new chats: a reply that ends after one belongs to the conversation it started in

function savedSettings() {
  try {
    return JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
  } catch {
    return {};
  }
}

function saveSettings() {
  const values = {};
  for (const id of SETTING_IDS) values[id] = document.getElementById(id).value;
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(values));
  sessionStorage.setItem(API_KEY_KEY, elements.apiKey.value);
}

function restoreSettings() {
  const values = savedSettings();
  for (const id of SETTING_IDS) {
    if (id !== "model" && typeof values[id] === "string") document.getElementById(id).value = values[id];
  }
  elements.apiKey.value = sessionStorage.getItem(API_KEY_KEY) || "";
}

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = elements.apiKey.value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

// An OpenAI-shaped error body (or anything else) as one sentence for people.
async function errorText(response) {
  const statusLine = `${response.status}${response.statusText ? " " + response.statusText : ""}`;
  let body = null;
  try {
    body = await response.json();
  } catch {
    return `The server answered ${statusLine}.`;
  }
  const error = body && body.error;
  if (!error || !error.message) return `The server answered ${statusLine}.`;
  const detail = error.param ? ` (parameter: ${error.param})` : "";
  return `The server refused the request (${statusLine}): ${error.message}${detail}`;
}

function scrollToEnd() {
  elements.conversation.scrollTop = elements.conversation.scrollHeight;
}

function addMessage(role, text) {
  elements.emptyHint.hidden = true;
  const element = document.createElement("div");
  element.className = "message";
  element.dataset.role = role;
  const textElement = document.createElement("div");
  textElement.className = "text";
  textElement.textContent = text;
  const stats = document.createElement("div");
  stats.className = "stats";
  element.append(textElement, stats);
  elements.conversation.append(element);
  scrollToEnd();
  return { element, textElement, stats };
}

function addError(text) {
  elements.emptyHint.hidden = true;
  const element = document.createElement("div");
  element.className = "error";
  element.setAttribute("role", "alert");
  element.textContent = text;
  elements.conversation.append(element);
  scrollToEnd();
}

function setStreaming(streaming) {
  elements.send.hidden = streaming;
  elements.stop.hidden = !streaming;
}

async function loadModels() {
  const previous = elements.model.value || savedSettings().model;
  let response;
  try {
    response = await fetch("v1/models", { headers: headers() });
  } catch (error) {
    elements.status.textContent = `Cannot reach the server: ${error.message}`;
    return;
  }
  if (!response.ok) {
    const text = await errorText(response);
    elements.status.textContent = text;
    if (response.status === 401) elements.status.textContent = "This server needs an API key (see Settings).";
    return;
  }
  const body = await response.json();
  elements.model.replaceChildren();
  for (const card of body.data) {
    const option = document.createElement("option");
    option.value = card.id;
    option.textContent = card.id;
    elements.model.append(option);
  }
  if (previous && body.data.some((card) => card.id === previous)) elements.model.value = previous;
  const card = body.data.find((item) => item.id === elements.model.value);
  const context = card && card.max_model_len ? `, context ${card.max_model_len} tokens` : "";
  elements.status.textContent = `${elements.model.value}${context}`;
}

function requestBody(messages) {
  const body = {
    model: elements.model.value,
    messages,
    stream: true,
    stream_options: { include_usage: true },
  };
  const temperature = elements.temperature.value.trim();
  if (temperature !== "") body.temperature = Number(temperature);
  const maxTokens = elements.maxTokens.value.trim();
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  return body;
}

function conversationMessages(userText) {
  const system = elements.systemPrompt.value.trim();
  const messages = system ? [{ role: "system", content: system }] : [];
  return messages.concat(history, [{ role: "user", content: userText }]);
}

// Yields the parsed JSON of each `data:` event until [DONE]; comment lines (pings) are skipped.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let boundary;
    while ((boundary = buffer.indexOf("\n\n")) !== -1) {
      const event = buffer.slice(0, boundary);
      buffer = buffer.slice(boundary + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data === "") continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function formatStats(usage, finishReason, started, firstTokenAt, endedAt) {
  const parts = [];
  const tokens = usage ? usage.completion_tokens : null;
  if (tokens !== null) parts.push(`${tokens} token${tokens === 1 ? "" : "s"}`);
  if (firstTokenAt !== null) parts.push(`${((firstTokenAt - started) / 1000).toFixed(2)} s to first token`);
  if (tokens !== null && firstTokenAt !== null && endedAt > firstTokenAt && tokens > 1) {
    parts.push(`${((tokens - 1) / ((endedAt - firstTokenAt) / 1000)).toFixed(1)} tokens/s`);
  }
  if (finishReason === "stopped") parts.push("stopped");
  else if (finishReason) parts.push(finishReason === "stop" ? "finished" : `finish: ${finishReason}`);
  return parts.join(" · ");
}

async function send() {
  const userText = elements.message.value;
  if (!userText.trim() || activeStream !== null) return;
  const messages = conversationMessages(userText);
  elements.message.value = "";
  const sent = addMessage("user", userText);
  const reply = addMessage("assistant", "");
  reply.element.classList.add("streaming");
  const controller = new AbortController();
  const stream = { controller, conversation };
  activeStream = stream;
  setStreaming(true);
  const started = performance.now();
  let firstTokenAt = null;
  let usage = null;
  let finishReason = null;
  let text = "";
  let failed = false;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody(messages)),
      signal: controller.signal,
    });
    if (!response.ok) {
      failed = true;
      addError(await errorText(response));
      return;
    }
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) {
        failed = true;
        addError(`The server stopped the reply: ${chunk.error.message || "unknown error"}`);
        break;
      }
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const content = choice.delta && choice.delta.content;
        if (content) {
          if (firstTokenAt === null) firstTokenAt = performance.now();
          text += content;
          reply.textElement.textContent = text;
          scrollToEnd();
        }
        if (choice.finish_reason) finishReason = choice.finish_reason;
      }
    }
  } catch (error) {
    if (error.name === "AbortError") {
      finishReason = "stopped";
    } else {
      failed = true;
      addError(`The connection to the server failed: ${error.message}`);
    }
  } finally {
    reply.element.classList.remove("streaming");
    reply.stats.textContent = formatStats(usage, finishReason, started, firstTokenAt, performance.now());
    if (failed && text === "") reply.element.remove();
    if (stream.conversation !== conversation) {
      // a new chat began meanwhile: this turn belongs to none that is still shown
    } else if (!failed || text !== "") {
      history.push({ role: "user", content: userText }, { role: "assistant", content: text });
    } else {
      sent.element.classList.add("unsent"); // not part of the conversation the model sees
      elements.message.value = elements.message.value || userText; // let the user fix and resend
    }
    if (activeStream === stream) {
      activeStream = null;
      setStreaming(false);
      elements.message.focus();
    }
  }
}

function newChat() {
  if (activeStream !== null) {
    activeStream.controller.abort();
    activeStream = null;
    setStreaming(false);
  }
  conversation += 1;
  history = [];
  for (const element of [...elements.conversation.children]) {
    if (element !== elements.emptyHint) element.remove();
  }
  elements.emptyHint.hidden = false;
  elements.message.focus();
}

elements.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
elements.message.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
elements.stop.addEventListener("click", () => {
  if (activeStream !== null) activeStream.controller.abort();
});
elements.newChat.addEventListener("click", newChat);
elements.settings.addEventListener("submit", (event) => event.preventDefault());
elements.toggleSettings.addEventListener("click", () => {
  const open = elements.settings.classList.toggle("open");
  elements.toggleSettings.setAttribute("aria-expanded", String(open));
});
for (const id of [...SETTING_IDS, "api-key"]) {
  document.getElementById(id).addEventListener("input", saveSettings);
  document.getElementById(id).addEventListener("change", saveSettings);
}
elements.apiKey.addEventListener("change", loadModels);

restoreSettings();
loadModels();
elements.message.focus();
