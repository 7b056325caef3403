"""The inline CSS and JS of a report page (the text filter and the figures-loaded status)."""

CSS = """
:root{--pos:#2e7d32;--neg:#c62828;--ink:#1f2328;--muted:#667085;--line:#e4e7ec;--bg:#f7f8fa;--acc:#3949ab}
*{box-sizing:border-box}body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--ink);background:var(--bg)}header{background:#1f2a44;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:20px}header .sub{opacity:.8;font-size:13px}
nav{position:sticky;top:0;z-index:5;background:#fff;border-bottom:1px solid var(--line);padding:8px 32px;
display:flex;gap:16px;align-items:center;flex-wrap:wrap}nav a{color:var(--acc);text-decoration:none}
nav input{margin-left:auto;padding:6px 10px;border:1px solid #c8ccd4;border-radius:6px;width:280px}
#filter-count{color:var(--muted);font-size:12px}main{max-width:1280px;margin:0 auto;padding:8px 32px 48px}
section{margin-top:18px}h2{font-size:18px;border-bottom:2px solid var(--line);padding-bottom:4px}
h3{font-size:15px;margin:0 0 6px}h4{font-size:13px;margin:10px 0 4px}
.query{background:#fff;border:1px solid var(--line);border-radius:8px;padding:14px 16px;margin:12px 0}
.qn{color:var(--muted);font-weight:500}.qtext{background:var(--bg);border-radius:6px;padding:6px 10px;
white-space:pre-wrap}.pair{display:grid;grid-template-columns:1fr 1fr;gap:18px}
@media (max-width:1000px){.pair{grid-template-columns:1fr}}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th{text-align:left;font-weight:600;color:var(--muted);border-bottom:1px solid var(--line);padding:4px 6px}
td{border-bottom:1px solid #f0f1f4;padding:4px 6px;vertical-align:top}
table.compact{width:auto;min-width:420px;margin:8px 0}td code{font-size:12px;white-space:nowrap}
.txt{white-space:pre-wrap;word-break:break-word}details.txt summary{cursor:pointer;list-style:none}
details.txt summary::-webkit-details-marker{display:none}details[open].txt summary{display:none}
.more{color:var(--acc);font-size:12px}.score{font-variant-numeric:tabular-nums;font-weight:600}
.pos{color:var(--pos)}.neg{color:var(--neg)}.bar{height:4px;background:#eef0f3;border-radius:2px;margin-top:3px;
min-width:60px}.bar span{display:block;height:4px;border-radius:2px}.bar.pos span{background:var(--pos)}
.bar.neg span{background:var(--neg)}.muted{color:var(--muted);font-weight:400}.small{font-size:12px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:10px 0}.card{background:#fff;border:1px solid var(--line);
border-radius:8px;padding:10px 14px;min-width:150px}.card .v{font-size:20px;font-weight:600}
.card .k{color:var(--muted);font-size:12px;max-width:260px}
.help{background:#eef2ff;border-left:4px solid var(--acc);padding:10px 14px;border-radius:4px;margin:10px 0}
.lacks{background:#fff8e1;border-left:4px solid #f9a825;padding:8px 14px;border-radius:4px;margin:10px 0}
.lacks ul{margin:4px 0 0;padding-left:20px}.note{background:#fff8e1;padding:8px 12px;border-radius:4px}
figure{margin:10px 0;background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px}
figure img{max-width:min(100%,980px);height:auto;display:block}figcaption{color:var(--muted);font-size:12px}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:12px}tr.outlier td{background:#fff5f5}
.flag{color:var(--neg);font-weight:600}.tag{background:#eceff1;border-radius:4px;padding:0 5px;font-size:11px}
.hidden{display:none!important}footer{color:var(--muted);font-size:12px;text-align:center;padding:20px}
"""

JS = """
(function(){
  var box=document.getElementById('filter'), count=document.getElementById('filter-count');
  var items=Array.prototype.slice.call(document.querySelectorAll('.filterable'));
  function apply(){
    var words=box.value.toLowerCase().split(/\\s+/).filter(Boolean), shown=0;
    items.forEach(function(el){
      var hay=el.getAttribute('data-search')||'';
      var ok=words.every(function(w){return hay.indexOf(w)>=0;});
      el.classList.toggle('hidden',!ok); if(ok) shown++;
    });
    count.textContent=words.length? shown+' of '+items.length+' shown' : items.length+' items';
    document.body.setAttribute('data-shown', String(shown));
  }
  box.addEventListener('input', apply);
  var m=/[#&]filter=([^&]*)/.exec(location.hash);
  if(m){box.value=decodeURIComponent(m[1]);}
  apply();
  function images(){
    var imgs=document.querySelectorAll('img.plot'), ok=0;
    for(var i=0;i<imgs.length;i++){ if(imgs[i].complete && imgs[i].naturalWidth>0) ok++; }
    var out=document.getElementById('images-status');
    out.textContent=ok+' of '+imgs.length+' figures loaded';
    document.body.setAttribute('data-images-loaded', ok+'/'+imgs.length);
  }
  if(document.readyState==='complete') images(); else window.addEventListener('load', images);
})();
"""
