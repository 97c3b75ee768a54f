// CheckStream operator console: progressive enhancement only. Without this file every
// page still works (the filter box submits, headers sort on the server).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const filter = document.getElementById("filter");
  const table = document.getElementById("tenants");
  if (!filter || !table) return;
  const rows = Array.from(table.tBodies[0].rows);
  // Filter as the operator types, instead of a page load per keystroke.
  filter.addEventListener("input", () => {
    const wanted = filter.value.trim().toLowerCase();
    for (const row of rows) {
      row.classList.toggle("hidden", !row.dataset.tenant.toLowerCase().includes(wanted));
    }
  });
});
