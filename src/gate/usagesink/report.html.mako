<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Gate usage ${chosen.start.isoformat()} to ${chosen.end.isoformat()}</title>
<style>
  body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5rem; color: #1d2433; }
  h1 { font-size: 1.4rem; margin: 0 0 1rem; }
  h2 { font-size: 1.1rem; margin: 1.6rem 0 0.5rem; }
  form { display: flex; flex-wrap: wrap; gap: 0.8rem; align-items: end; background: #f3f5f9; padding: 0.8rem;
         border-radius: 6px; }
  label { display: flex; flex-direction: column; font-size: 0.8rem; gap: 0.2rem; }
  input, select, button { font-size: 0.9rem; padding: 0.25rem 0.4rem; }
  button { background: #2f5bd3; color: white; border: 0; border-radius: 4px; padding: 0.35rem 0.9rem; }
  .cards { display: flex; flex-wrap: wrap; gap: 0.8rem; margin-top: 1rem; }
  .card { border: 1px solid #d8dde8; border-radius: 6px; padding: 0.6rem 0.9rem; min-width: 9rem; }
  .card .label { font-size: 0.75rem; color: #5b6477; }
  .card .value { font-size: 1.25rem; font-weight: 600; }
  table { border-collapse: collapse; font-size: 0.85rem; width: 100%; }
  .table-wrap { overflow-x: auto; }
  td:first-child { white-space: nowrap; }
  th, td { border-bottom: 1px solid #e3e6ee; padding: 0.25rem 0.45rem; text-align: right; }
  th:first-child, td:first-child { text-align: left; }
  th { background: #f3f5f9; }
  .grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(40rem, 1fr)); gap: 1rem 2rem; }
  .grid > div { min-width: 0; }
  #by-model-section { grid-column: 1 / -1; }  /* model ids are long: the whole width */
  .chart { width: 100%; height: 320px; }
  .muted { color: #5b6477; font-size: 0.8rem; }
</style>
</head>
<body>
<h1>Gate usage</h1>
<form id="filters" method="get" action="/report">
  <label>From <input type="date" name="from" id="from" value="${chosen.start.isoformat()}"></label>
  <label>To <input type="date" name="to" id="to" value="${chosen.end.isoformat()}"></label>
  <label>User <select name="user" id="user"><option value="">all users</option>
  % for value in choices["user"]:
    <option value="${value}" ${'selected' if value == chosen.user else ''}>${value}</option>
  % endfor
  </select></label>
  <label>Group <select name="group" id="group"><option value="">all groups</option>
  % for value in choices["group"]:
    <option value="${value}" ${'selected' if value == chosen.group else ''}>${value}</option>
  % endfor
  </select></label>
  <label>Model <select name="model" id="model"><option value="">all models</option>
  % for value in choices["model"]:
    <option value="${value}" ${'selected' if value == chosen.model else ''}>${value}</option>
  % endfor
  </select></label>
  <button type="submit" id="apply">Apply</button>
  <a id="csv" href="/report/usage.csv?${query}">Export CSV</a>
</form>

<div class="cards" id="totals">
  <div class="card"><div class="label">Requests</div><div class="value" id="total-requests">${totals["requests"]}</div></div>
  <div class="card"><div class="label">Cost (USD)</div><div class="value" id="total-cost">$${usd(totals["cost"])}</div></div>
  <div class="card"><div class="label">Input tokens</div><div class="value" id="total-input">${totals["input_tokens"]}</div></div>
  <div class="card"><div class="label">Output tokens</div><div class="value" id="total-output">${totals["output_tokens"]}</div></div>
  <div class="card"><div class="label">Cache writes</div><div class="value" id="total-cache-write">${totals["cache_write_tokens"]}</div></div>
  <div class="card"><div class="label">Cache reads</div><div class="value" id="total-cache-read">${totals["cache_read_tokens"]}</div></div>
  <div class="card"><div class="label">Cache hit share</div><div class="value" id="cache-hit-share">${hit_share}</div></div>
  <div class="card"><div class="label">Errors</div><div class="value" id="total-errors">${totals["errors"]}</div></div>
</div>
% if totals["unpriced"]:
<p class="muted">${totals["unpriced"]} successful calls used a model with no price in the price table: their cost is not included.</p>
% endif

<div class="grid">
  <div><h2>Cost by day (USD)</h2><div class="chart" id="chart-cost"></div></div>
  <div><h2>Tokens by day</h2><div class="chart" id="chart-tokens"></div></div>
</div>

<div class="grid">
<%def name="breakdown(title, anchor, rows, label)">
  <div id="${anchor}-section"><h2>${title}</h2><div class="table-wrap">
  <table id="${anchor}"><thead><tr><th>${label}</th><th>Requests</th><th>Input</th><th>Output</th><th>Cache writes</th>
  <th>Cache reads</th><th>Hit share</th><th>Cost (USD)</th></tr></thead><tbody>
  % for row in rows:
    <tr><td>${row["key"]}</td><td>${row["requests"]}</td><td>${row["input_tokens"]}</td><td>${row["output_tokens"]}</td>
    <td>${row["cache_write_tokens"]}</td><td>${row["cache_read_tokens"]}</td><td>${percent(row)}</td>
    <td>${usd(row["cost"])}</td></tr>
  % endfor
  % if not rows:
    <tr><td colspan="8" class="muted">no calls in this period</td></tr>
  % endif
  </tbody></table></div></div>
</%def>
${breakdown("By user", "by-user", by_user, "User")}
${breakdown("By group", "by-group", by_group, "Group")}
${breakdown("By model", "by-model", by_model, "Model")}
  <div><h2>Top sessions</h2><div class="table-wrap">
  <table id="sessions"><thead><tr><th>Claude Code session</th><th>User</th><th>Requests</th><th>Tokens</th>
  <th>Cost (USD)</th><th>Last call (UTC)</th></tr></thead><tbody>
  % for row in sessions:
    <tr><td>${row["key"]}</td><td>${row["subject"]}</td><td>${row["requests"]}</td><td>${row["total_tokens"]}</td>
    <td>${usd(row["cost"])}</td><td>${row["last"].strftime("%Y-%m-%d %H:%M")}</td></tr>
  % endfor
  % if not sessions:
    <tr><td colspan="6" class="muted">no Claude Code sessions in this period</td></tr>
  % endif
  </tbody></table></div>
  <h2>Errors by type</h2>
  <table id="errors"><thead><tr><th>Error type</th><th>Calls</th></tr></thead><tbody>
  % for row in errors:
    <tr><td>${row["key"]}</td><td>${row["requests"]}</td></tr>
  % endfor
  % if not errors:
    <tr><td colspan="2" class="muted">no errors in this period</td></tr>
  % endif
  </tbody></table></div>
</div>
<p class="muted">Times and days are UTC. Costs come from Gate's price table, as each event was priced.</p>

<script type="application/json" id="chart-data">${chart_json | n}</script>
<script src="/report/assets/plotly.min.js"></script>
<script>
  const data = JSON.parse(document.getElementById("chart-data").textContent);
  const layout = (title) => ({barmode: "stack", margin: {t: 10, r: 10, b: 40, l: 60}, yaxis: {title: {text: title}},
    xaxis: {type: "category"}, legend: {orientation: "h"}});
  const bars = (series) => series.map((s) => ({type: "bar", name: s.name, x: data.days, y: s.y}));
  const config = {displaylogo: false, responsive: true};
  Plotly.newPlot("chart-cost", bars(data.cost), layout("USD"), config);
  Plotly.newPlot("chart-tokens", bars(data.tokens), layout("tokens"), config);
  document.body.dataset.chartsReady = "true";
</script>
</body>
</html>
