// The rater's name, kept in a cookie (shared by every port of the host, unlike localStorage).
function raterName() {
  var match = document.cookie.match(/(?:^|; )saejax_rater=([^;]*)/);
  return match ? decodeURIComponent(match[1]) : '';
}
function setRaterName(name) {
  document.cookie = 'saejax_rater=' + encodeURIComponent(name) + '; path=/; SameSite=Strict; ' +
                    (name ? 'max-age=31536000' : 'max-age=0');
}
