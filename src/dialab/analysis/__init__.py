"""The flavor comparison: metrics from run folders, figures, and the HTML report."""
