(function () {
  "use strict";
  document.documentElement.classList.add("js");
  var runs = Array.prototype.slice.call(document.querySelectorAll(".run"));
  var current = null;
  // Turns are chosen by the hash; as element ids it would scroll the question out of view.
  document.querySelectorAll(".run[id], main > .turn[id]").forEach(function (el) {
    el.dataset.ident = el.id;
    el.removeAttribute("id");
  });
  function byIdent(ident) {
    return ident ? document.querySelector('[data-ident="' + CSS.escape(ident) + '"]') : null;
  }

  function turnsOf(run) {
    return Array.prototype.slice.call(run.querySelectorAll("main > .turn"));
  }
  function linksOf(run) {
    return Array.prototype.slice.call(run.querySelectorAll("nav .tlink"));
  }

  function show(run, position, remember) {
    runs.forEach(function (r) { r.classList.toggle("on", r === run); });
    var turns = turnsOf(run);
    current = { run: run, position: 0 };
    if (!turns.length) { return; }
    position = Math.max(1, Math.min(position, turns.length));
    current.position = position;
    turns.forEach(function (t, i) { t.classList.toggle("on", i === position - 1); });
    linksOf(run).forEach(function (a, i) {
      a.classList.toggle("on", i === position - 1);
      if (i === position - 1) {
        a.setAttribute("aria-current", "true");
        reveal(a);
      } else {
        a.removeAttribute("aria-current");
      }
    });
    if (remember) {
      history.replaceState(null, "", "#" + turns[position - 1].dataset.ident);
      var top = run.querySelector(".layout").getBoundingClientRect().top + window.scrollY;
      if (window.scrollY > top) { window.scrollTo(0, top); }
    }
  }

  function fit() {
    // The sidebar scrolls on its own and ends where the window does.
    document.querySelectorAll(".run.on nav.turns").forEach(function (nav) {
      var top = Math.max(0, nav.getBoundingClientRect().top);
      nav.style.maxHeight = window.innerHeight - top + "px";
    });
  }

  function reveal(link) {
    var nav = link.closest("nav");
    fit();
    var top = link.offsetTop; // the sticky sidebar is the link's offset parent
    if (top < nav.scrollTop || top + link.offsetHeight > nav.scrollTop + nav.clientHeight) {
      nav.scrollTop = Math.max(0, top - nav.clientHeight / 3);
    }
  }

  function fromHash() {
    var target = byIdent(decodeURIComponent(location.hash.slice(1)));
    if (target && target.classList.contains("turn")) {
      var run = target.closest(".run");
      show(run, turnsOf(run).indexOf(target) + 1, false);
    } else if (target && target.classList.contains("run")) {
      show(target, 1, false);
    } else if (runs.length) {
      show(runs[runs.length - 1], 1, false);
    }
  }

  function filter(box) {
    // Rows whose prompt or answer holds the typed words, and whose answer is the chosen chip's.
    var query = box.querySelector(".filter").value.trim().toLowerCase();
    var answer = box.dataset.answer;
    var rows = box.querySelectorAll(".sclist > .sc");
    var shown = 0;
    rows.forEach(function (row) {
      var hit = (!query || row.textContent.toLowerCase().indexOf(query) >= 0) &&
        (answer === undefined || row.dataset.a === answer);
      row.hidden = !hit;
      if (hit) { shown += 1; }
    });
    var any = query || answer !== undefined;
    box.querySelector(".shown").textContent = any ? shown + " of " + rows.length : "";
    box.querySelectorAll(".chip").forEach(function (chip) {
      chip.classList.toggle("on", chip.dataset.q === answer);
    });
  }

  document.addEventListener("click", function (event) {
    var link = event.target.closest(".tlink");
    if (link) {
      event.preventDefault();
      show(link.closest(".run"), Number(link.dataset.pos), true);
      return;
    }
    var chip = event.target.closest(".chip");
    if (chip) {
      var box = chip.closest(".subcalls");
      if (box.dataset.answer === chip.dataset.q) {
        delete box.dataset.answer;
      } else {
        box.dataset.answer = chip.dataset.q;
      }
      filter(box);
      return;
    }
    var question = event.target.closest(".question");
    if (question && !question.classList.contains("missing")) {
      question.classList.toggle("full");
    }
  });

  document.addEventListener("input", function (event) {
    if (event.target.matches(".filter")) { filter(event.target.closest(".subcalls")); }
  });

  document.addEventListener("keydown", function (event) {
    if (event.target.matches("input, textarea")) {
      if (event.key === "Escape" && event.target.matches(".filter")) {
        var box = event.target.closest(".subcalls");
        event.target.value = "";
        delete box.dataset.answer;
        filter(box);
        event.target.blur();
      }
      return;
    }
    if (event.metaKey || event.ctrlKey || event.altKey || !current) { return; }
    var turn = turnsOf(current.run)[current.position - 1];
    switch (event.key) {
      case "j": case "ArrowRight": case "n":
        show(current.run, current.position + 1, true); break;
      case "k": case "ArrowLeft": case "p":
        show(current.run, current.position - 1, true); break;
      case "g":
        show(current.run, 1, true); break;
      case "G":
        show(current.run, turnsOf(current.run).length, true); break;
      case "/":
        var search = turn && turn.querySelector(".filter");
        if (search) { search.focus(); search.select(); }
        break;
      case "e":
        if (turn) {
          var rows = turn.querySelectorAll(".sc");
          var open = Array.prototype.some.call(rows, function (r) { return !r.open; });
          rows.forEach(function (r) { r.open = open; });
        }
        break;
      case "a":
        current.run.classList.toggle("all"); break;
      default:
        return;
    }
    event.preventDefault();
  });

  window.addEventListener("hashchange", fromHash);
  window.addEventListener("scroll", fit, { passive: true });
  window.addEventListener("resize", fit);
  window.scrollTo(0, 0);
  fromHash();
})();
