"""Fine-tuning plumbing for `adb train`: task schema (config), data, model loaders, heads.

Submodules are imported explicitly (`adapterdb.trainers.models`, ...) so that importing the
package stays cheap: transformers, datasets and peft load only where they are used.
"""
