// The web interface's only script; every page works without it.
"use strict";

// A page marked data-refresh-seconds (an image or a batch still being captioned) fetches itself
// again until the mark is gone, and swaps in the new content of <main>.
function refreshWhilePending() {
  const main = document.getElementById("main");
  const seconds = Number(main && main.dataset.refreshSeconds);
  if (!seconds) return;
  setTimeout(async () => {
    try {
      const response = await fetch(location.href, {credentials: "same-origin", headers: {Accept: "text/html"}});
      if (!response.ok || response.redirected) return;  // signed out, or an error: leave the page as it is
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html").getElementById("main");
      main.innerHTML = fresh.innerHTML;
      if (fresh.dataset.refreshSeconds) main.dataset.refreshSeconds = fresh.dataset.refreshSeconds;
      else delete main.dataset.refreshSeconds;
    } catch (e) {
      // the network dropped: try again at the next tick
    }
    refreshWhilePending();
  }, seconds * 1000);
}

// Single-key shortcuts of the review queue (WCAG 2.1.4: a checkbox turns them off; the choice is
// kept in this browser). A key typed into a field is never taken as a shortcut.
function reviewShortcuts() {
  const toggle = document.getElementById("shortcuts");
  if (!toggle) return;
  toggle.checked = localStorage.getItem("captioner.shortcuts") !== "off";
  toggle.addEventListener("change", () => localStorage.setItem("captioner.shortcuts", toggle.checked ? "on" : "off"));
  const NOT_TYPED_INTO = ["checkbox", "radio", "button", "submit", "reset"];
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (target.tagName === "TEXTAREA" && event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      target.form.requestSubmit();
      return;
    }
    const typing = target.closest("textarea, select, [contenteditable]") ||
      (target.tagName === "INPUT" && !NOT_TYPED_INTO.includes(target.type));
    if (!toggle.checked || typing || event.ctrlKey || event.metaKey || event.altKey) return;
    const control = document.querySelector(`[data-shortcut="${CSS.escape(event.key)}"]`);
    if (!control) return;
    event.preventDefault();
    if (control.tagName === "TEXTAREA") {
      control.focus();
      control.select();
    } else {
      control.click();
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  refreshWhilePending();
  reviewShortcuts();
});
