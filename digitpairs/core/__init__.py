"""Code every stage runs: params.yaml's schema and validation, paths, file output and stage error
handling, the study's statistics, seeds and variants, and the numeric pins that importing the
package sets in every process. Imports nothing from the other subpackages.

A folder per concern, so dvc.yaml can name each stage's code as one or two folders."""
