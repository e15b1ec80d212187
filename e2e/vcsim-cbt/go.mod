module sendense.io/e2e/vcsim-cbt

go 1.25.0
