(function () {
  var input = document.getElementById('filter');
  var rows = document.querySelectorAll('#latents tbody tr');
  input.addEventListener('input', function () {
    var query = input.value.toLowerCase();
    var shown = 0;
    rows.forEach(function (row) {
      var hit = !query || row.textContent.toLowerCase().indexOf(query) >= 0;
      row.style.display = hit ? '' : 'none';
      if (hit) shown++;
    });
    document.getElementById('shown').textContent = shown;
  });
  document.body.setAttribute('data-ready', '1');
})();
