def test_smoke(open_page, tmp_path):
    html = tmp_path / "a.html"
    html.write_text("<html><body><h1 id=x>hi</h1><script>document.getElementById('x').textContent='ok'</script></body></html>")
    p = open_page(html)
    assert p.page.text_content("#x") == "ok" and p.errors == []
    assert p.screenshot("smoke.png").stat().st_size > 0
