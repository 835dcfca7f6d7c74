// Train LoRA tab: what gradio cannot do. Every global is prefixed loraTrainer.

// Train and Test run as WebUI jobs. Like the WebUI's own textual-inversion trainer (textualInversion.js):
// make a task id, show the WebUI's progress bar (progressbar.js requestProgress, fed by /internal/progress)
// above the status box, and hand the id to the Python handler as its first input.
function loraTrainerStartJob() {
    var id = randomId();
    requestProgress(id, gradioApp().getElementById('lora_trainer_status'), null, function() {}, null);
    var args = Array.from(arguments);
    args[0] = id;
    return args;
}

// Re-render the Lora cards of txt2img and img2img so the new LoRA shows without a click. The server-side
// list is already refreshed by the tab; these hidden buttons are the extra-networks panes' own refresh
// (ui_extra_networks.py: "{tabname}_{page}_extra_refresh_internal", the same ids in Forge).
function loraTrainerRefreshNetworks() {
    ['txt2img', 'img2img'].forEach(function(tabname) {
        var button = gradioApp().getElementById(tabname + '_lora_extra_refresh_internal');
        if (button) button.dispatchEvent(new Event('click'));
    });
    return [];
}

// After Merge into checkpoint: press the checkpoint dropdown's own refresh button, as a user would, so the page
// lists the new file (the tab has refreshed the server-side list already). A1111's quicksettings button is
// "refresh_sd_model_checkpoint" (ui_settings.py: "refresh_" + the option's key), Forge's "forge_refresh_checkpoint"
// (modules_forge/main_entry.py).
function loraTrainerRefreshCheckpoints() {
    ['refresh_sd_model_checkpoint', 'forge_refresh_checkpoint'].forEach(function(id) {
        var button = gradioApp().getElementById(id);
        if (button) button.dispatchEvent(new Event('click'));
    });
    return [];
}
