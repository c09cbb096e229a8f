# Sourced by .ci/run: Debian's Chromium for the vetting page's real-browser test (driven by Playwright, whose own
# browser download does not work here). Exports DIALAB_TEST_CHROMIUM.

install_test_browser() {
  local found
  found=$(command -v chromium || command -v chromium-browser || true)
  if [ -z "$found" ] && command -v apt-get >/dev/null; then
    echo "installing Chromium from Debian's packages" >&2
    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 ||
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)) >&2
    found=$(command -v chromium || true)
  fi
  if [ -z "$found" ]; then
    echo "no Chromium could be installed; the browser test will fail" >&2
    return 0
  fi
  export DIALAB_TEST_CHROMIUM="$found"
}
