// Applies the saved theme before the first paint (no flash of the wrong theme). A file, not
// an inline script: the console's Content-Security-Policy allows scripts from 'self' only.
(function () {
  var saved = localStorage.getItem("qit-theme");
  if (saved === "dark" || saved === "light") document.documentElement.dataset.theme = saved;
})();
