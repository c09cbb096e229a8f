"""``dialab vet``: a local web page to look at candidate cutouts and label them real or bogus."""
