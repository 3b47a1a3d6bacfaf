// The qfedit console's only script. Pages are rendered on the server; this file
// - asks for an API token once and keeps it in sessionStorage (never in a URL or a cookie),
// - fetches each page's HTML from /ui/part/... with that token as a bearer header,
// - follows links and GET forms inside the console without a full reload,
// - refreshes the parts marked data-live (batches, alias history) every few seconds.
"use strict";

const KEY = "qfedit.console.token";
const main = document.getElementById("main");
const login = document.getElementById("login");
const loginError = document.getElementById("login-error");
const forget = document.getElementById("forget");
let timers = [];
let shown = 0; // the newest navigation wins when answers arrive out of order

function token() {
  return sessionStorage.getItem(KEY);
}

function partUrl(href) {
  const url = new URL(href, location.origin);
  const rel = url.pathname.replace(/^\/ui\/?/, "") || "models";
  return "/ui/part/" + rel + url.search;
}

async function reason(response) {
  try {
    const body = await response.json();
    return body.message || response.statusText;
  } catch {
    return response.statusText;
  }
}

async function fetchPart(url) {
  return fetch(url, {
    headers: { Authorization: "Bearer " + token(), Accept: "text/html" },
    credentials: "omit",
    cache: "no-store",
  });
}

function askToken(message) {
  stopLive();
  main.replaceChildren();
  login.hidden = false;
  forget.hidden = true;
  loginError.textContent = message || "";
  login.querySelector("input").focus();
}

function showError(status, message) {
  const box = document.createElement("div");
  box.className = "error";
  box.setAttribute("role", "alert");
  const title = document.createElement("h1");
  title.textContent = status === 404 ? "Not found" : status === 403 ? "Not allowed" : "Error " + status;
  const text = document.createElement("p");
  text.textContent = message;
  box.append(title, text);
  main.replaceChildren(box);
}

async function load(href, push) {
  if (!token()) {
    askToken();
    return;
  }
  const mine = ++shown;
  main.setAttribute("aria-busy", "true");
  const response = await fetchPart(partUrl(href));
  if (mine !== shown) return;
  main.removeAttribute("aria-busy");
  if (response.status === 401) {
    sessionStorage.removeItem(KEY);
    askToken(await reason(response));
    return;
  }
  login.hidden = true;
  forget.hidden = false;
  if (push) history.pushState(null, "", href);
  stopLive();
  if (!response.ok) {
    showError(response.status, await reason(response));
    return;
  }
  main.innerHTML = await response.text();
  const heading = main.querySelector("h1");
  document.title = (heading ? heading.textContent.trim() + " · " : "") + "qfedit console";
  if (push) main.focus();
  startLive();
}

function stopLive() {
  timers.forEach(clearInterval);
  timers = [];
}

function startLive() {
  for (const part of main.querySelectorAll("[data-live]")) {
    const every = 1000 * Number(part.dataset.every || 3);
    timers.push(
      setInterval(async () => {
        if (document.hidden) return;
        const response = await fetchPart(part.dataset.live);
        if (response.ok && part.isConnected) part.innerHTML = await response.text();
      }, every),
    );
  }
}

function inConsole(url) {
  return url.origin === location.origin && /^\/ui(\/|$)/.test(url.pathname) && !url.pathname.startsWith("/ui/static/");
}

document.addEventListener("click", (event) => {
  const link = event.target.closest("a");
  if (!link || event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey) return;
  const url = new URL(link.href, location.href);
  if (!inConsole(url)) return;
  event.preventDefault();
  load(url.pathname + url.search, true);
});

document.addEventListener("submit", (event) => {
  const form = event.target;
  event.preventDefault();
  if (form === login) {
    const value = form.querySelector("input").value.trim();
    if (!value) return;
    sessionStorage.setItem(KEY, value);
    form.reset();
    load(location.pathname + location.search, false);
    return;
  }
  const url = new URL(form.getAttribute("action") || location.pathname, location.href);
  const query = new URLSearchParams();
  for (const [name, value] of new FormData(form)) {
    if (String(value).trim()) query.append(name, String(value).trim());
  }
  url.search = query.toString();
  load(url.pathname + url.search, true);
});

forget.addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  askToken("The token was forgotten.");
});

window.addEventListener("popstate", () => load(location.pathname + location.search, false));
load(location.pathname + location.search, false);
