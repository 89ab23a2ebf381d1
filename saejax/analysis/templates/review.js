(function () {
  // The rating panel: the rater's name is asked once (review_name.js keeps it); a rating is
  // POSTed to the review server, which appends it to ratings.jsonl.
  var RATINGS = ['interpretable', 'partly', 'not'];
  var form = document.getElementById('rating');
  var item = form.getAttribute('data-item');
  var next = form.getAttribute('data-next'), previous = form.getAttribute('data-previous');
  var rater = document.getElementById('rater'), label = document.getElementById('label');
  var status = document.getElementById('status');

  function showName() {
    var name = raterName();
    document.getElementById('ask-name').hidden = !!name;
    document.getElementById('named').hidden = !name;
    document.getElementById('rater-name').textContent = name;
    rater.value = name;
    return name;
  }
  function currentName() {
    var name = (raterName() || rater.value || '').trim();
    if (name) setRaterName(name);
    return name;
  }
  function mark(rating) {
    form.querySelectorAll('button[data-rating]').forEach(function (b) {
      b.className = b.getAttribute('data-rating') === rating ? 'chosen' : '';
    });
  }
  function save(rating) {
    var name = currentName();
    if (!name) {
      status.textContent = 'Type your name first.';
      rater.focus();
      return;
    }
    showName();
    mark(rating);
    status.textContent = 'Saving...';
    fetch('/api/ratings', {
      method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({item: item, rating: rating, label: label.value, rater: name})
    }).then(function (answer) {
      if (!answer.ok) return answer.text().then(function (t) { throw new Error(t); });
      return answer.json();
    }).then(function () {
      status.textContent = 'Saved: ' + rating + '.';
      document.body.setAttribute('data-saved', rating);
      if (next) location.href = next;
    }).catch(function (e) { status.textContent = 'Not saved: ' + e.message; });
  }
  function load() {  // this rater's earlier rating of this page
    var name = showName();
    if (!name) return Promise.resolve();
    return fetch('/api/ratings?item=' + encodeURIComponent(item) + '&rater=' +
                 encodeURIComponent(name)).then(function (r) { return r.json(); })
      .then(function (answer) {
        if (answer.rating) {
          mark(answer.rating);
          if (!label.value) label.value = answer.label || '';
          status.textContent = 'You rated this ' + answer.rating + '.';
        }
      });
  }

  form.querySelectorAll('button[data-rating]').forEach(function (b) {
    b.addEventListener('click', function () { save(b.getAttribute('data-rating')); });
  });
  document.getElementById('change-name').addEventListener('click', function (e) {
    e.preventDefault();
    setRaterName('');
    showName();
    rater.focus();
  });
  rater.addEventListener('change', function () { currentName(); showName(); });
  document.addEventListener('keydown', function (e) {
    var typing = e.target === rater || e.target === label;
    if (typing) {
      if (e.key === 'Enter' || e.key === 'Escape') {
        e.preventDefault();
        if (e.target === rater) { currentName(); showName(); }
        e.target.blur();
      }
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    var index = ['1', '2', '3'].indexOf(e.key);
    if (index >= 0) { e.preventDefault(); save(RATINGS[index]); }
    else if (e.key === 'l') { e.preventDefault(); label.focus(); }
    else if (e.key === 'ArrowRight' && next) location.href = next;
    else if (e.key === 'ArrowLeft' && previous) location.href = previous;
  });
  load().then(function () { document.body.setAttribute('data-ready', '1'); });
})();
