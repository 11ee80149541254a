"""`python -m autocoder.sandbox`: the launcher the shipped kernelspecs name."""

from autocoder.sandbox import main

main()
