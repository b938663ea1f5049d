// lorafleet console: small progressive enhancements; every page works without this file.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // the playground's personalization dial shows its value as it moves
  const scale = document.getElementById("pg-scale");
  const shown = document.getElementById("pg-scale-value");
  if (scale && shown) {
    scale.addEventListener("input", () => { shown.textContent = Number(scale.value).toFixed(2); });
  }
  // a rollback asks once more before it moves live
  for (const form of document.querySelectorAll("form.rollback")) {
    form.addEventListener("submit", (event) => {
      const to = form.querySelector("select");
      const label = to && to.selectedOptions.length ? to.selectedOptions[0].textContent : "an earlier version";
      if (!window.confirm(`Move live to ${label}?`)) { event.preventDefault(); }
    });
  }
});
